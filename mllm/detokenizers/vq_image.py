"""Direct pixel decoder for discrete image codes (the VQ/FSQ tokenizers' other half): a ViT.

    codes [N] -> codebook lookup [N, D] -> PixelDecoder -> image
    PixelDecoder: tokens [N, D] -> [N, width] -> ViT -> g² patch vectors -> p×p pixel patches

Two token layouts, g = image_size / patch_size:
- "grid": the N = g² tokens are a row-major grid (`fsq_image`); each token
  becomes the pixels of its own patch.
- "sequence": the N tokens are a 1D sequence (`query_image`, continuous
  tokens); g² learned patch queries read them through the ViT (TiTok's
  decoder) and become the patches.

The codebook lookup and the checks are `CodebookDecoder`'s (codebook.py).
`PixelDecoder` alone also serves the diffusion
recipe, which pre-trains continuous tokens through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from mllm.detokenizers.base import register
from mllm.detokenizers.codebook import CodebookDecoder, check_code_config
from mllm.media import Image
from mllm.tokenizers.fsq_image import check_vit, grid_positions, vit


@dataclass
class PixelDecoderArch:
    """The decoder's size: the part a recipe chooses."""

    patch_size: int = 4  # pixels per output patch side
    width: int = 128
    depth: int = 4
    heads: int = 4

    def __post_init__(self):
        if self.depth < 1 or self.width % self.heads:
            raise ValueError(f"need depth >= 1 and width divisible by heads, got {self.depth}, {self.width}, {self.heads}")


class PixelDecoder(nn.Module):
    """tokens [B, N, D] -> pixels [B, 3, S, S], nominally in [0, 1] (unclamped: the training target)."""

    def __init__(self, image_size: int, num_tokens: int, token_dim: int, layout: str, arch: PixelDecoderArch):
        super().__init__()
        check_vit(image_size, arch.patch_size, arch.width, arch.heads)
        self.grid, self.patch_size, self.layout = image_size // arch.patch_size, arch.patch_size, layout
        if layout == "grid" and num_tokens != self.grid**2:
            raise ValueError(f"a grid of {num_tokens} tokens does not match {self.grid**2} patches of {arch.patch_size}²")
        self.proj_in = nn.Linear(token_dim, arch.width)
        self.token_pos = nn.Parameter(torch.randn(num_tokens, arch.width) * 0.02)
        if layout == "sequence":
            self.patch_queries = nn.Parameter(grid_positions(self.grid, arch.width))
        self.transformer = vit(arch.width, arch.depth, arch.heads)
        self.to_pixels = nn.Linear(arch.width, 3 * arch.patch_size**2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(tokens) + self.token_pos  # [B, N, W]
        if self.layout == "sequence":
            x = torch.cat([x, self.patch_queries.expand(len(x), -1, -1)], dim=1)  # [B, N + g², W]
        patches = self.to_pixels(self.transformer(x)[:, -self.grid**2:])  # [B, g², 3p²]
        p = self.patch_size
        pixels = rearrange(patches, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=self.grid, p1=p, p2=p)
        return (pixels + 1) / 2


@dataclass
class VQImageDecoderConfig:
    """The codes it reads (they come from the tokenizer) and its size."""

    image_size: int = 32
    num_tokens: int = 64
    codebook_size: int = 1000
    code_dim: int = 4
    layout: Literal["grid", "sequence"] = "grid"
    arch: PixelDecoderArch = field(default_factory=PixelDecoderArch)

    def __post_init__(self):
        check_code_config(self.num_tokens, self.codebook_size, self.code_dim)
        check_vit(self.image_size, self.arch.patch_size, self.arch.width, self.arch.heads)
        grid = self.image_size // self.arch.patch_size
        if self.layout == "grid" and self.num_tokens != grid**2:
            raise ValueError(f"a grid of {self.num_tokens} tokens does not match {grid**2} patches of {self.arch.patch_size}²")


@register
class VQImageDecoder(CodebookDecoder):
    name = "vq_image"
    modality = "image"
    config_class = VQImageDecoderConfig

    def __init__(self, config: VQImageDecoderConfig):
        super().__init__(config)
        c = config
        self.decoder = PixelDecoder(c.image_size, c.num_tokens, c.code_dim, c.layout, c.arch)  # [B, N, D] -> [B, 3, S, S]

    def to_media(self, decoded: torch.Tensor) -> Image:
        return Image.from_tensor(decoded)
