"""Continuous audio tokens: the encoder of a small log-mel autoencoder (a GIVT-style β-VAE).

    Audio (any rate, any channels) ──prepare_audio──▶ 16 kHz mono [N]
        ──LogMel──▶ normalised log-mel [M, F]   F = N // hop + 1 mel frames (10 ms at the defaults)
        ──encoder──▶ latents [F / downsample, D] (25 Hz × 16 at the defaults)

The encoder is a 1-D ConvNeXt over time with the mel bins as channels, and a
strided convolution down to the latent rate. It returns the posterior mean;
the posterior variance and the KL term only shape the latent space while
training, so latents are smooth, about unit scale and robust to the small
errors an LM's GMM or diffusion head makes. The autoencoder's decoder is part
of the de-tokenizer (`mllm/detokenizers/diffusion_mel.py`), where it gives the
coarse mel that the diffusion model refines; the `audio_mel_diffusion` recipe
trains the two halves together and saves them apart.

The log-mel front end, `prepare_audio` and the ConvNeXt block are shared by
the other audio tokenizers and de-tokenizers.

Input handling, for every audio tokenizer: channels are averaged to mono; any
sample rate is resampled (polyphase) to `sample_rate`; samples outside
[-1, 1] (clipping) are clipped; silence is ordinary input. Non-`Audio` input
and non-finite samples raise `MediaError`. A clip shorter than one token is
padded with silence to one token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mllm.media import Audio, MediaError
from mllm.tokenizers.base import MediaTokenizer, register


@dataclass
class MelConfig:
    """Log-mel spectrogram: STFT magnitude -> Slaney mel filterbank -> natural log, then (x - mean) / std."""

    sample_rate: int = 16000
    n_fft: int = 1024
    win_length: int = 640  # 40 ms
    hop_length: int = 160  # 10 ms: 100 mel frames per second
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8000.0
    floor: float = 1e-5  # magnitudes below it are clamped before the log
    norm_mean: float = -5.0  # log-mel mean and spread of the espeak corpus: normalised values are about N(0, 1)
    norm_std: float = 2.5

    def __post_init__(self):
        if not 0 < self.hop_length <= self.win_length <= self.n_fft:
            raise ValueError(f"need 0 < hop_length {self.hop_length} <= win_length {self.win_length} <= n_fft {self.n_fft}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min {self.f_min} < f_max {self.f_max} <= sample_rate / 2")
        if self.n_mels < 1 or self.floor <= 0 or self.norm_std <= 0:  # floor 0: log(0) of silence; norm_std 0: x / 0
            raise ValueError(f"need n_mels >= 1, floor > 0 and norm_std > 0, got {self.n_mels}, {self.floor}, "
                             f"{self.norm_std}")


def prepare_audio(media: Audio, sample_rate: int, who: str) -> torch.Tensor:
    """Audio -> float32 [N] mono at `sample_rate`, clipped to [-1, 1]; `who` names the caller in errors."""
    if not isinstance(media, Audio):
        raise MediaError(f"<{who}>", f"expected an Audio, got {type(media).__name__}")
    if not np.isfinite(media.samples).all():  # Audio checks at construction; samples may have been edited since
        raise MediaError(f"<{who}>", "audio samples contain NaN or inf")
    mono = media.to_mono().resample(sample_rate)
    return torch.from_numpy(mono.samples[0]).clamp(-1, 1)


def resampled_length(media: Audio, sample_rate: int) -> int:
    """How many samples `prepare_audio` returns, without resampling."""
    g = math.gcd(media.sample_rate, sample_rate)
    return math.ceil(media.num_samples * (sample_rate // g) / (media.sample_rate // g))


class LogMel(nn.Module):
    """Waveform [B, N] -> normalised log-mel [B, n_mels, N // hop + 1] (centred frames; any N >= 1)."""

    def __init__(self, cfg: MelConfig):
        super().__init__()
        self.cfg = cfg
        basis = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.f_min, fmax=cfg.f_max)
        self.register_buffer("basis", torch.from_numpy(basis), persistent=False)  # [M, n_fft // 2 + 1]
        self.register_buffer("window", torch.hann_window(cfg.win_length), persistent=False)

    def magnitude(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, N] -> mel magnitudes [B, M, F]."""
        c = self.cfg
        spec = torch.stft(wave, c.n_fft, c.hop_length, c.win_length, self.window, pad_mode="constant",
                          return_complex=True).abs()  # constant: edges padded with silence, as librosa does
        return self.basis @ spec

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.magnitude(wave).clamp(min=self.cfg.floor).log())

    def normalize(self, log_mel: torch.Tensor) -> torch.Tensor:
        return (log_mel - self.cfg.norm_mean) / self.cfg.norm_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cfg.norm_std + self.cfg.norm_mean


class ConvNeXt1d(nn.Module):
    """ConvNeXt block over time (as in Vocos): depthwise conv, LayerNorm, MLP, layer scale. [B, C, T] -> same."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: int = 3):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.scale = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dwconv(x).transpose(1, 2))  # [B, T, C]
        return x + (self.scale * self.mlp(h)).transpose(1, 2)


def convnext_stack(in_dim: int, dim: int, depth: int, out_dim: int) -> nn.Sequential:
    """[B, in_dim, T] -> [B, out_dim, T]: a 1x1 conv in, `depth` ConvNeXt blocks, a 1x1 conv out."""
    return nn.Sequential(nn.Conv1d(in_dim, dim, 1), *[ConvNeXt1d(dim) for _ in range(depth)], nn.Conv1d(dim, out_dim, 1))


@dataclass
class MelLatentConfig:
    mel: MelConfig = field(default_factory=MelConfig)
    downsample: int = 4  # mel frames per latent: 25 latents per second at the defaults
    latent_dim: int = 16
    channels: int = 192  # of the encoder, and of the autoencoder's decoder
    depth: int = 3  # ConvNeXt blocks in the encoder, and in the decoder

    def __post_init__(self):
        if self.downsample < 1 or self.latent_dim < 1 or self.channels < 1 or self.depth < 0:
            raise ValueError(f"downsample, latent_dim and channels must be >= 1 and depth >= 0, got {self.downsample}, "
                             f"{self.latent_dim}, {self.channels}, {self.depth}")

    @property
    def samples_per_token(self) -> int:
        return self.mel.hop_length * self.downsample

    @property
    def token_rate(self) -> float:
        return self.mel.sample_rate / self.samples_per_token


@register
class MelLatentTokenizer(MediaTokenizer):
    name = "mel_latent"
    modality = "audio"
    kind = "continuous"
    config_class = MelLatentConfig

    def __init__(self, config: MelLatentConfig):
        super().__init__(config)
        c, r = config, config.downsample
        self.mel = LogMel(c.mel)
        self.encoder = nn.Sequential(  # [B, M, F] -> [B, 2D, F / r]: posterior mean and log-variance
            convnext_stack(c.mel.n_mels, c.channels, c.depth, c.channels),
            nn.Conv1d(c.channels, 2 * c.latent_dim, r, stride=r),
        )

    @property
    def feature_dim(self) -> int:
        return self.config.latent_dim

    def num_tokens(self, media: Audio) -> int:
        return max(1, math.ceil(resampled_length(media, self.config.mel.sample_rate) / self.config.samples_per_token))

    def mel_frames(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, N] -> normalised log-mel [B, M, r * ceil(N / (r * hop))]: padded with silence to whole latents."""
        hop = self.config.samples_per_token
        tokens = max(1, math.ceil(wave.shape[-1] / hop))
        wave = F.pad(wave, (0, tokens * hop - wave.shape[-1]))
        return self.mel(wave)[..., : tokens * self.config.downsample]  # drop the centred STFT's extra last frame

    def posterior(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised log-mel [B, M, F] -> mean, log-variance [B, D, F / r]."""
        mean, logvar = self.encoder(mel).chunk(2, dim=1)
        return mean, logvar.clamp(-20, 10)

    @torch.no_grad()
    def encode(self, media: Audio) -> torch.Tensor:
        wave = prepare_audio(media, self.config.mel.sample_rate, self.name)
        mean, _ = self.posterior(self.mel_frames(wave[None]))
        return mean[0].T.contiguous()  # [T, D]
