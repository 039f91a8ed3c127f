"""Discrete 1D causal-query image tokenizer (SEED / TiTok style) with a VQ codebook.

    image -> p×p patch embeddings ─┐
    N learned queries ─────────────┴─> transformer -> N query outputs -> VQ -> N codes

Patches attend to each other; query i attends to every patch and to queries
0..i only (SEED's causal Q-Former), so the token sequence has a left-to-right
order an LM can predict, and a prefix of it is computed without the rest.
The VQ codebook (vector-quantize-pytorch) is updated by EMA over a
low-dimensional lookup space (`code_dim`, as in ViT-VQGAN, which keeps more
codes in use), and gradients pass the quantiser by the rotation trick (the
library's default). Dead codes (EMA usage below `dead_code_threshold`) are
re-seeded from the current batch's vectors during training.

The pixel decoder is the `vq_image` de-tokenizer (recipe `image_query`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from mllm.media import Image
from mllm.tokenizers.base import MediaTokenizer, register
from mllm.tokenizers.fsq_image import PatchEmbed, check_vit, image_batch, vit


@dataclass
class QueryImageConfig:
    image_size: int = 32
    patch_size: int = 4
    num_tokens: int = 32
    width: int = 128  # transformer width
    depth: int = 4
    heads: int = 4
    codebook_size: int = 1024
    code_dim: int = 16  # the VQ lookup space
    commitment_weight: float = 0.25
    ema_decay: float = 0.99
    # a code is dead when its EMA usage per training batch falls below this; keep it well under the mean
    # usage, batch_size × num_tokens / codebook_size, or live codes get re-seeded too and never settle
    dead_code_threshold: float = 0.1

    def __post_init__(self):
        check_vit(self.image_size, self.patch_size, self.width, self.heads)
        if self.num_tokens < 1 or self.codebook_size < 2:
            raise ValueError(f"need num_tokens >= 1 and codebook_size >= 2, got {self.num_tokens}, {self.codebook_size}")


def causal_query_mask(num_patches: int, num_queries: int) -> torch.Tensor:
    """Bool [P + Q, P + Q], True = may not attend: patches see patches; query i sees patches and queries <= i."""
    size = num_patches + num_queries
    blocked = torch.zeros(size, size, dtype=torch.bool)
    blocked[:num_patches, num_patches:] = True
    blocked[num_patches:, num_patches:] = torch.ones(num_queries, num_queries, dtype=torch.bool).triu(1)
    return blocked


@register
class QueryImageTokenizer(MediaTokenizer):
    name = "query_image"
    modality = "image"
    kind = "discrete"
    layout: ClassVar[str] = "sequence"  # a 1D token sequence, not a grid
    config_class = QueryImageConfig

    def __init__(self, config: QueryImageConfig):
        super().__init__(config)
        c = config
        num_patches = (c.image_size // c.patch_size) ** 2
        self.embed = PatchEmbed(c.image_size, c.patch_size, c.width)
        self.queries = nn.Parameter(torch.randn(c.num_tokens, c.width) * 0.02)
        self.transformer = vit(c.width, c.depth, c.heads)
        self.to_code = nn.Linear(c.width, c.code_dim)
        self.vq = VectorQuantize(
            dim=c.code_dim,
            codebook_size=c.codebook_size,
            decay=c.ema_decay,
            commitment_weight=c.commitment_weight,
            threshold_ema_dead_code=c.dead_code_threshold,
        )
        self.register_buffer("mask", causal_query_mask(num_patches, c.num_tokens), persistent=False)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def code_dim(self) -> int:
        return self.config.code_dim

    @property
    def tokens_per_image(self) -> int:
        return self.config.num_tokens

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def codebook(self) -> torch.Tensor:
        """[K, D]: the vector every code stands for."""
        return self.vq.codebook

    def num_tokens(self, media: Image) -> int:
        return self.config.num_tokens

    def query_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] in [0, 1] -> pre-quantisation vectors [B, N, code_dim], causal in N."""
        patches = self.embed(pixels)  # [B, P, W]
        queries = self.queries.expand(len(pixels), -1, -1)  # [B, N, W]
        out = self.transformer(torch.cat([patches, queries], dim=1), mask=self.mask)
        return self.to_code(out[:, patches.shape[1]:])

    def quantize(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixels [B, 3, S, S] in [0, 1] -> (vectors [B, N, D] with straight-through gradients, codes [B, N], commitment loss)."""
        vectors, codes, commitment = self.vq(self.query_features(pixels))
        return vectors, codes.long(), commitment.sum()

    @torch.no_grad()
    def encode_batch(self, images: list[Image]) -> torch.Tensor:
        """LongTensor [B, N] of codes in [0, codebook_size)."""
        return self.quantize(image_batch(images, self.config.image_size, self.name))[1]

    def encode(self, media: Image) -> torch.Tensor:
        return self.encode_batch([media])[0]
