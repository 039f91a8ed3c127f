"""Direct pixel decoder for discrete image codes (the VQ/FSQ tokenizers' other half): a ViT.

    codes [N] -> codebook lookup [N, D] -> PixelDecoder -> image
    PixelDecoder: tokens [N, D] -> [N, width] -> ViT -> g² patch vectors -> p×p pixel patches

Two token layouts, g = image_size / patch_size:
- "grid": the N = g² tokens are a row-major grid (`fsq_image`); each token
  becomes the pixels of its own patch.
- "sequence": the N tokens are a 1D sequence (`query_image`, continuous
  tokens); g² learned patch queries read them through the ViT (TiTok's
  decoder) and become the patches.

`codebook` [K, D] is a copy of the tokenizer's, set with `set_codebook`
after joint training; in training the decoder reads the tokenizer's
quantised vectors directly (`decode_vectors`). `guidance` and `steps` do not
apply to a direct decoder. `PixelDecoder` alone also serves the diffusion
recipe, which pre-trains continuous tokens through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from mllm.detokenizers.base import DeTokenizer, register
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


@register
class VQImageDecoder(DeTokenizer):
    name = "vq_image"
    modality = "image"
    kind = "discrete"
    config_class = VQImageDecoderConfig

    def __init__(self, config: VQImageDecoderConfig):
        super().__init__(config)
        c = config
        self.register_buffer("codebook", torch.zeros(c.codebook_size, c.code_dim))
        self.decoder = PixelDecoder(c.image_size, c.num_tokens, c.code_dim, c.layout, c.arch)

    @torch.no_grad()
    def set_codebook(self, codebook: torch.Tensor) -> None:
        """Copy the tokenizer's code vectors [K, D] in."""
        if codebook.shape != self.codebook.shape:
            raise ValueError(f"expected a codebook {list(self.codebook.shape)}, got {list(codebook.shape)}")
        self.codebook.copy_(codebook)

    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """vectors [B, N, D] -> pixels [B, 3, S, S], nominally in [0, 1] (unclamped: the training target)."""
        return self.decoder(vectors)

    def check_codes(self, codes: torch.Tensor) -> None:
        """Refuse anything but integer codes [B, N] in [0, codebook_size), naming the shape or value at fault."""
        c = self.config
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype.is_complex:
            kind = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"{self.name}: expected integer codes, got {kind}")
        if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] != c.num_tokens:
            raise ValueError(f"{self.name}: expected codes [B >= 1, {c.num_tokens}], got {list(codes.shape)}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= c.codebook_size:
            raise ValueError(f"{self.name}: codes must lie in [0, {c.codebook_size}), got values in [{low}, {high}]")

    @torch.no_grad()
    def decode_batch(self, codes: torch.Tensor) -> list[Image]:
        """codes [B, N] -> B images of image_size²."""
        self.check_codes(codes)
        pixels = self.decode_vectors(self.codebook[codes.long()])
        return [Image.from_tensor(p) for p in pixels]

    def decode(
        self,
        tokens: torch.Tensor,
        *,
        guidance: float = 1.0,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Image:
        n = self.config.num_tokens
        if not isinstance(tokens, torch.Tensor) or tokens.shape != (n,):
            got = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"{self.name}: expected codes [{n}], got {got}")
        return self.decode_batch(tokens[None])[0]
