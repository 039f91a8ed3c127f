"""The raw-patch de-tokenizer: the exact inverse of `mllm.tokenizers.patch`.

Features [N, 3p²] in [-1, 1] are folded back into an image of `image_size`².
It has no weights; `guidance` and `steps` do not apply.
"""

from __future__ import annotations

import torch

from mllm.detokenizers.base import DeTokenizer, register
from mllm.media import Image
from mllm.tokenizers.patch import PatchConfig, PatchTokenizer


@register
class PatchDeTokenizer(DeTokenizer):
    name = "patch"
    modality = "image"
    kind = "continuous"
    config_class = PatchConfig

    def __init__(self, config: PatchConfig):
        super().__init__(config)
        self.patches = PatchTokenizer(config)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, *, guidance: float | None = None, steps: int | None = None, generator=None) -> Image:
        return self.patches.decode(tokens)  # features outside [-1, 1] clip to black or white in Image.from_tensor
