"""Continuous image tokenizer (SEED-X style): encoder features resampled to N query tokens.

    image -> stem -> ViT -> (S/p)² patch features -> Resampler (N learned queries) -> N tokens [N, feature_dim]

The stem cuts the image into p×p patches, either with one linear projection per patch (ViT's "patch") or with
a small strided convolution stack ("conv", as in Xiao et al. 2021, "Early convolutions help transformers see
better"): on a few thousand small images the convolutions' locality is what a tiny ViT cannot learn.

The `Resampler` is a Perceiver resampler: N learned queries that
self-attend and cross-attend to the encoder's features, layer after layer.
Its output is layer-normalised per token (no affine), so every token has
zero mean and unit variance: a fixed scale for the LM's regression head.
`hf_vision` puts the same resampler over a pretrained CLIP/SigLIP encoder.

With `query_grid`, the N queries tile the image as a √N×√N grid and a fixed
additive attention bias, −d²/2σ² from a query's cell to each feature's
(σ = half a query cell), starts each one reading its own region; attention
learns from there (Qwen-VL's resampler, which SEED-X uses, gets the same
from 2D positions added to queries and keys). Free queries must first
discover where to look, and at tiny scale they collapse to one global
summary for a long time. Grid tokens come out in row-major order
(`layout` "grid"), which a diffusion de-tokenizer can also read as a map.

Recipe `image_diffusion` trains the tokens through a throwaway pixel
decoder, then a diffusion de-tokenizer conditioned on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mllm.media import Image
from mllm.tokenizers.base import MediaTokenizer, register
from mllm.tokenizers.fsq_image import check_stem, check_vit, image_batch, patch_stem, vit


def locality_bias(query_grid: int, feature_grid: int, extra: int = 0) -> torch.Tensor:
    """[q², extra + f²] additive attention bias from a q×q query grid to `extra` free features (bias 0,
    e.g. a CLS token) followed by an f×f feature grid, both row-major over the same image."""
    q = (torch.arange(query_grid) + 0.5) / query_grid  # cell centres in [0, 1]
    f = (torch.arange(feature_grid) + 0.5) / feature_grid
    qy, qx = torch.meshgrid(q, q, indexing="ij")
    fy, fx = torch.meshgrid(f, f, indexing="ij")
    d2 = (qy.reshape(-1, 1) - fy.reshape(1, -1)) ** 2 + (qx.reshape(-1, 1) - fx.reshape(1, -1)) ** 2
    sigma = 0.5 / query_grid
    return torch.cat([torch.zeros(query_grid**2, extra), -d2 / (2 * sigma**2)], dim=1)


class Resampler(nn.Module):
    """features [B, P, in_dim] -> tokens [B, num_tokens, out_dim], per-token layer-normalised.

    `feature_grid` (f, with P = extra + f²) puts the queries on a √N×√N grid with a locality bias;
    None leaves them free.
    """

    def __init__(self, in_dim: int, num_tokens: int, out_dim: int, width: int, depth: int, heads: int,
                 feature_grid: int | None = None, num_features: int | None = None):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, width)
        self.queries = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        layer = nn.TransformerDecoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(width))
        self.proj_out = nn.Linear(width, out_dim)
        self.norm_out = nn.LayerNorm(out_dim, elementwise_affine=False)
        bias = None
        if feature_grid is not None:
            side = math.isqrt(num_tokens)
            if side * side != num_tokens:
                raise ValueError(f"a query grid needs a square number of tokens, got {num_tokens}")
            bias = locality_bias(side, feature_grid, (num_features or feature_grid**2) - feature_grid**2)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(len(features), -1, -1)  # [B, N, W]
        out = self.layers(queries, self.proj_in(features), memory_mask=self.bias)
        return self.norm_out(self.proj_out(out))


@dataclass
class ResamplerImageConfig:
    image_size: int = 32
    patch_size: int = 4
    num_tokens: int = 64
    query_grid: bool = True  # queries tile the image (N must be a square); False: free 1D queries
    feature_dim: int = 64  # D of each token
    width: int = 128  # ViT and resampler width
    depth: int = 2  # ViT layers
    resampler_depth: int = 2
    heads: int = 4
    stem: str = "patch"  # "patch": one linear projection per patch; "conv": strided 3×3 convolutions (p a power of 2)

    def __post_init__(self):
        check_vit(self.image_size, self.patch_size, self.width, self.heads)
        check_stem(self.stem, self.patch_size)
        if self.query_grid and math.isqrt(self.num_tokens) ** 2 != self.num_tokens:
            raise ValueError(f"query_grid needs a square num_tokens, got {self.num_tokens}")
        if self.num_tokens < 1 or self.feature_dim < 1:
            raise ValueError(f"need num_tokens and feature_dim >= 1, got {self.num_tokens}, {self.feature_dim}")


@register
class ResamplerImageTokenizer(MediaTokenizer):
    name = "resampler_image"
    modality = "image"
    kind = "continuous"
    config_class = ResamplerImageConfig

    def __init__(self, config: ResamplerImageConfig):
        super().__init__(config)
        c = config
        self.embed = patch_stem(c.stem, c.image_size, c.patch_size, c.width)
        self.encoder = vit(c.width, c.depth, c.heads)
        grid = c.image_size // c.patch_size if c.query_grid else None
        self.resampler = Resampler(c.width, c.num_tokens, c.feature_dim, c.width, c.resampler_depth, c.heads, grid)

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def layout(self) -> str:
        return "grid" if self.config.query_grid else "sequence"

    def num_tokens(self, media: Image) -> int:
        return self.config.num_tokens

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] in [0, 1] -> tokens [B, N, D] (differentiable: the recipe trains through it)."""
        return self.resampler(self.encoder(self.embed(pixels)))

    @torch.no_grad()
    def encode_batch(self, images: list[Image]) -> torch.Tensor:
        """FloatTensor [B, N, D]."""
        return self.features(image_batch(images, self.config.image_size, self.name))

    def encode(self, media: Image) -> torch.Tensor:
        return self.encode_batch([media])[0]
