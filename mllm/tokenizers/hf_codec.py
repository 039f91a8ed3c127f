"""Pretrained neural audio codecs that transformers implements (EnCodec, DAC, Mimi), from a local directory.

    Audio ──mono, resampled to the codec's rate, padded to whole frames──▶ [n]
        ──codec.encode──▶ codes [q, T] of the first `codebooks` residual codebooks
        ──frame-major flattening──▶ tokens [T · q]: t0q0, t0q1, …, t1q0, …   token = q · K + code

`codebooks: 1` keeps only the first (coarsest; for Mimi, the semantic)
codebook, as AnyGPT does: one token per frame and a vocabulary of K codes.
`codebooks: q` keeps the first q, flattened frame by frame; codebook i's codes
are offset by i · K, so the vocabulary is q · K and every position's codebook
can be read back from the token (the de-tokenizer checks it).

The weights stay in `path`, loaded with `local_files_only` and never with
remote code; a saved tokenizer directory records only the path and the
codebook count. EnCodec's 48 kHz variant (stereo, normalised chunks with
per-chunk scales) is refused: 1-D tokens cannot carry its scales.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mllm.config import ConfigError, to_dict
from mllm.media import Audio
from mllm.module import ConfiguredModule
from mllm.tokenizers.base import MediaTokenizer, register
from mllm.tokenizers.mel_latent import prepare_audio, resampled_length

CODECS = ("encodec", "dac", "mimi")  # transformers model types


@dataclass
class HFCodecConfig:
    path: str  # a local directory written by the codec's save_pretrained
    codebooks: int = 1  # how many residual codebooks become tokens, first (coarsest) first

    def __post_init__(self):
        if self.codebooks < 1:
            raise ValueError(f"codebooks must be >= 1, got {self.codebooks}")


class HFCodec(nn.Module):
    """A transformers codec behind one interface: waveform [n] <-> codes [q, T]."""

    def __init__(self, config: HFCodecConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel  # here, not at import: transformers is slow to import

        if not Path(config.path).is_dir():
            raise FileNotFoundError(f"{config.path}: no such codec directory")
        if not (Path(config.path) / "config.json").is_file():
            raise FileNotFoundError(f"{config.path}: no config.json (not a directory the codec's save_pretrained wrote)")
        c = AutoConfig.from_pretrained(config.path, local_files_only=True)
        if c.model_type not in CODECS:
            raise ConfigError("path", f"{config.path}: a {c.model_type!r} model, not one of the codecs {list(CODECS)}")
        if c.model_type == "encodec" and (c.normalize or c.chunk_length_s or c.audio_channels != 1):
            raise ConfigError("path", f"{config.path}: EnCodec with normalised chunks or stereo (the 48 kHz model) "
                                      "is not supported")
        model = AutoModel.from_pretrained(config.path, local_files_only=True).eval()
        self.model, self.kind = model, c.model_type
        self.sample_rate = int(c.sampling_rate)
        self.codebook_size = int(c.codebook_size)
        if self.kind == "encodec":
            self.hop, available = c.hop_length, model.quantizer.get_num_quantizers_for_bandwidth(max(c.target_bandwidths))
        elif self.kind == "dac":
            self.hop, available = c.hop_length, c.n_codebooks
        else:  # Mimi: the encoder's hop, then a downsampling to frame_rate
            self.hop = math.prod(c.upsampling_ratios) * round(c.encodec_frame_rate / c.frame_rate)
            available = c.num_quantizers
        if config.codebooks > available:
            raise ConfigError("codebooks", f"{config.path}: asked for {config.codebooks} codebooks, the codec has "
                                           f"{available}")
        self.codebooks = config.codebooks

    def frames(self, num_samples: int) -> int:
        return max(1, math.ceil(num_samples / self.hop))

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """[n] at sample_rate -> codes [q, T], T = ceil(n / hop)."""
        x = F.pad(wave, (0, self.frames(len(wave)) * self.hop - len(wave)))[None, None]  # [1, 1, T · hop]
        q, m = self.codebooks, self.model
        if self.kind == "encodec":
            bandwidth = min(b for b in m.config.target_bandwidths if m.quantizer.get_num_quantizers_for_bandwidth(b) >= q)
            codes = m.encode(x, bandwidth=bandwidth).audio_codes[0]  # [1, q', T] (one chunk)
        elif self.kind == "dac":
            codes = m.encode(x, n_quantizers=q).audio_codes
        else:
            codes = m.encode(x, num_quantizers=q).audio_codes
        return codes[0, :q]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [q, T] -> waveform [T · hop]."""
        m = self.model
        codes = codes.to(next(m.parameters()).device)[None]  # [1, q, T]: generation hands codes over on the CPU
        if self.kind == "encodec":
            wave = m.decode(codes[None], [None]).audio_values
        elif self.kind == "dac":
            wave = m.decode(audio_codes=codes).audio_values
        else:
            wave = m.decode(codes).audio_values
        return wave.reshape(-1)


def save_config_only(module: ConfiguredModule, path: str | os.PathLike) -> Path:
    """Write `<config_file>` (name + config) without weights: they stay in the codec's own directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / module.config_file).write_text(yaml.safe_dump({"name": module.name, "config": to_dict(module.config)}))
    return path


@register
class HFCodecTokenizer(MediaTokenizer):
    name = "hf_codec"
    modality = "audio"
    kind = "discrete"
    config_class = HFCodecConfig
    weights_elsewhere = True  # in the codec's own directory (config.path)

    def __init__(self, config: HFCodecConfig):
        super().__init__(config)
        self.codec = HFCodec(config)

    @property
    def codebook_size(self) -> int:
        return self.codec.codebooks * self.codec.codebook_size

    @property
    def token_rate(self) -> float:
        return self.codec.codebooks * self.codec.sample_rate / self.codec.hop

    def num_tokens(self, media: Audio) -> int:
        return self.codec.codebooks * self.codec.frames(resampled_length(media, self.codec.sample_rate))

    def encode(self, media: Audio) -> torch.Tensor:
        codes = self.codec.encode(prepare_audio(media, self.codec.sample_rate, self.name))  # [q, T]
        offsets = torch.arange(len(codes))[:, None] * self.codec.codebook_size
        return (codes.long() + offsets).T.reshape(-1)  # [T · q], frame-major

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        return save_config_only(self, path)
