"""Decoding the tokens of `hf_codec` (EnCodec, DAC, Mimi from a local directory) back to a waveform.

    tokens [T · q] (frame-major, codebook i offset by i · K) ──▶ codes [q, T] ──codec.decode──▶ Audio at the codec's rate

The de-tokenizer shares the tokenizer's `HFCodecConfig` (path, codebooks) and
loads the same codec. It is deterministic: `guidance` and `steps` are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mllm.detokenizers.audio_codec import check_codes
from mllm.detokenizers.base import DeTokenizer, register
from mllm.media import Audio
from mllm.tokenizers.hf_codec import HFCodec, HFCodecConfig, save_config_only


@register
class HFCodecDecoder(DeTokenizer):
    name = "hf_codec"
    modality = "audio"
    kind = "discrete"
    config_class = HFCodecConfig
    weights_elsewhere = True  # in the codec's own directory (config.path)

    def __init__(self, config: HFCodecConfig):
        super().__init__(config)
        self.codec = HFCodec(config)

    def decode(self, tokens: torch.Tensor, *, guidance: float | None = None, steps: int | None = None,
               generator: torch.Generator | None = None) -> Audio:
        q, k = self.codec.codebooks, self.codec.codebook_size
        tokens = check_codes(tokens, q * k, self.name)
        if len(tokens) % q:
            raise ValueError(f"{self.name}: {len(tokens)} tokens are not whole frames of {q} codebooks")
        frames = tokens.reshape(-1, q)  # [T, q]
        codebook = frames // k
        if (codebook != torch.arange(q)).any():
            t, i = (codebook != torch.arange(q)).nonzero()[0].tolist()
            raise ValueError(f"{self.name}: token {t * q + i} belongs to codebook {int(codebook[t, i])}, "
                             f"expected codebook {i} (frame-major order, {q} per frame)")
        wave = self.codec.decode((frames % k).T)
        return Audio(wave.clamp(-1, 1).cpu().numpy()[None], self.codec.sample_rate)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        return save_config_only(self, path)
