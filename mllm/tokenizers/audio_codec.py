"""A WavTokenizer-style speech codec with one codebook: the encoder and quantizer half.

    Audio ──prepare_audio──▶ 16 kHz mono [N] ──LogMel──▶ [M, 2T] ──patchify (stride 2), ConvNeXt──▶ [T, d]
        ──FSQ──▶ codes [T] in [0, prod(levels))

T = ceil(N / 320): 50 tokens per second at the defaults (`downsample` mel
frames of `mel.hop_length` samples per token). The quantizer is finite scalar
quantisation (FSQ, from vector-quantize-pytorch): each of the d = len(levels)
channels is bounded and rounded to `levels[i]` values, so the codebook is the
grid of size prod(levels) and needs no learning, commitment loss or dead-code
restarts. The decoder that turns codes back into a waveform is the
de-tokenizer `audio_codec` (`mllm/detokenizers/audio_codec.py`); the two
share this `CodecConfig`, are trained together by the `audio_codec` recipe
and saved apart.

Input handling is that of every audio tokenizer (see `mel_latent.py`): mono,
resampled, clipped to [-1, 1]; NaN raises `MediaError`; silence is ordinary
input; a clip shorter than one token becomes one token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import FSQ

from mllm.media import Audio
from mllm.tokenizers.base import MediaTokenizer, register
from mllm.tokenizers.mel_latent import LogMel, MelConfig, convnext_stack, prepare_audio, resampled_length


@dataclass
class CodecConfig:
    mel: MelConfig = field(default_factory=MelConfig)
    downsample: int = 2  # mel frames per token: 16000 / (160 · 2) = 50 tokens per second
    levels: list[int] = field(default_factory=lambda: [7, 5, 5, 5, 5])  # FSQ: codebook_size = prod(levels) = 4375
    encoder_channels: int = 256
    encoder_depth: int = 4
    decoder_channels: int = 256
    decoder_depth: int = 6

    def __post_init__(self):
        if self.downsample < 1 or not self.levels or min(self.levels) < 2:
            raise ValueError(f"need downsample >= 1 and FSQ levels >= 2, got {self.downsample}, {self.levels}")

    @property
    def samples_per_token(self) -> int:
        return self.mel.hop_length * self.downsample

    @property
    def token_rate(self) -> float:
        return self.mel.sample_rate / self.samples_per_token

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)


@register
class CodecTokenizer(MediaTokenizer):
    name = "audio_codec"
    modality = "audio"
    kind = "discrete"
    config_class = CodecConfig

    def __init__(self, config: CodecConfig):
        super().__init__(config)
        c = config
        self.mel = LogMel(c.mel)
        self.encoder = nn.Sequential(  # [B, M, F] -> [B, d, F / downsample]: patchify, then work at the token rate
            nn.Conv1d(c.mel.n_mels, c.encoder_channels, c.downsample, stride=c.downsample),
            convnext_stack(c.encoder_channels, c.encoder_channels, c.encoder_depth, len(c.levels)),
        )
        self.quantizer = FSQ(c.levels)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def num_tokens(self, media: Audio) -> int:
        return max(1, math.ceil(resampled_length(media, self.config.mel.sample_rate) / self.config.samples_per_token))

    def quantize(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wave [B, N], N a multiple of samples_per_token -> quantised vectors [B, T, d] (straight-through), codes [B, T]."""
        frames = wave.shape[-1] // self.config.mel.hop_length
        mel = self.mel(wave)[..., :frames]  # drop the centred STFT's extra last frame
        vectors, codes = self.quantizer(self.encoder(mel).transpose(1, 2))
        return vectors, codes.long()

    @torch.no_grad()
    def encode(self, media: Audio) -> torch.Tensor:
        wave = prepare_audio(media, self.config.mel.sample_rate, self.name)
        hop = self.config.samples_per_token
        wave = F.pad(wave, (0, self.num_tokens(media) * hop - wave.shape[-1]))  # silence up to whole tokens
        return self.quantize(wave[None])[1][0]
