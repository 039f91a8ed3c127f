"""The decoder half of the single-codebook speech codec: codes -> waveform, Vocos-style.

    codes [T] ──FSQ grid──▶ [T, d] ──ConvNeXt at the token rate──▶ [T + 1, C]
        ──linear head──▶ log-magnitude and phase [T + 1, n_fft / 2 + 1] ──iSTFT (hop = 320)──▶ [T · 320] samples

As in WavTokenizer, the backbone runs at the token rate and the inverse STFT
does all the upsampling, with n_fft = 4 · hop. The code -> vector map is
FSQ's fixed grid, so the decoder needs nothing from the encoder but the
shared `CodecConfig`. It is deterministic: `guidance` and `steps` are ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import FSQ

from mllm.detokenizers.base import DeTokenizer, register
from mllm.media import Audio
from mllm.tokenizers.audio_codec import CodecConfig
from mllm.tokenizers.mel_latent import convnext_stack


def check_codes(tokens: torch.Tensor, codebook_size: int, who: str) -> torch.Tensor:
    """A 1-D integer tensor [N], N >= 1, of codes in [0, codebook_size): else ValueError naming the shape or range."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.is_floating_point() or not len(tokens):
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{who}: expected a non-empty 1-D integer tensor of codes [N], got {shape}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= codebook_size:
        raise ValueError(f"{who}: codes must lie in [0, {codebook_size}), got values in [{low}, {high}]")
    return tokens.long()


@register
class CodecDecoder(DeTokenizer):
    name = "audio_codec"
    modality = "audio"
    kind = "discrete"
    config_class = CodecConfig

    def __init__(self, config: CodecConfig):
        super().__init__(config)
        c = config
        self.hop = c.samples_per_token
        self.n_fft = 4 * self.hop
        self.quantizer = FSQ(c.levels)
        self.backbone = convnext_stack(len(c.levels), c.decoder_channels, c.decoder_depth, c.decoder_channels)
        self.head = nn.Linear(c.decoder_channels, self.n_fft + 2)  # log-magnitude and phase of n_fft / 2 + 1 bins
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """Quantised vectors [B, T, d] -> waveform [B, T · hop]."""
        x = F.pad(vectors.transpose(1, 2), (0, 1), mode="replicate")  # [B, d, T + 1]: T + 1 centred frames
        log_mag, phase = self.head(self.backbone(x).transpose(1, 2)).chunk(2, dim=-1)  # [B, T + 1, n_fft / 2 + 1]
        spec = torch.polar(log_mag.clamp(max=6).exp(), phase).transpose(1, 2)
        return torch.istft(spec, self.n_fft, self.hop, window=self.window, length=vectors.shape[1] * self.hop)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, *, guidance: float | None = None, steps: int | None = None,
               generator: torch.Generator | None = None) -> Audio:
        codes = check_codes(tokens, self.config.codebook_size, self.name).to(self.window.device)
        wave = self(self.quantizer.indices_to_codes(codes[None]))[0]
        return Audio(wave.clamp(-1, 1).cpu().numpy()[None], self.config.mel.sample_rate)
