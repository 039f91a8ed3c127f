"""Direct frame decoder for video tokens: the `video_divot_fsq` codes' other half, and a probe for continuous ones.

    codes [N] -> codebook lookup [N, C] -> FramesDecoder -> clip
    FramesDecoder: tokens [N, D] -> [N, W], plus g² learned patch queries -> ViT
                   -> each query: its p×p patch in all T frames (3·T·p² values) -> [T, 3, S, S]

All frames of a patch come out of one query, so the clip is decoded
jointly. Tokens on a space-time grid (`token_grid` = (a, s): N = a·s²,
time-major, as `video_divot` makes them) also go straight to the patches
under their cell: each patch query adds a projection of its cell's a tokens
[a·D], so no query has to learn where its content is. The codebook lookup
and the checks are `CodebookDecoder`'s (codebook.py). `FramesDecoder` alone also serves
recipe `video_divot`, which pre-trains continuous tokens through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mllm.detokenizers.base import register
from mllm.detokenizers.codebook import CodebookDecoder, check_code_config
from mllm.detokenizers.vq_image import PixelDecoderArch
from mllm.media import Video
from mllm.tokenizers.fsq_image import check_vit, grid_positions, vit


def frames_decoder_arch() -> PixelDecoderArch:
    """The frame decoder's default size: vq_image's decoder architecture, two layers deep."""
    return PixelDecoderArch(depth=2)


class FramesDecoder(nn.Module):
    """tokens [B, N, D] -> clips [B, T, 3, S, S], nominally in [0, 1] (unclamped: the training target)."""

    def __init__(self, frames: int, image_size: int, num_tokens: int, token_dim: int, arch: PixelDecoderArch,
                 token_grid: tuple[int, int] | None = None):
        super().__init__()
        check_vit(image_size, arch.patch_size, arch.width, arch.heads)
        self.frames, self.grid, self.patch_size = frames, image_size // arch.patch_size, arch.patch_size
        self.token_grid = token_grid
        check_token_grid(token_grid, num_tokens)
        if token_grid is not None:
            self.cell_proj = nn.Linear(token_grid[0] * token_dim, arch.width)
        self.proj_in = nn.Linear(token_dim, arch.width)
        self.token_pos = nn.Parameter(torch.randn(num_tokens, arch.width) * 0.02)
        self.patch_queries = nn.Parameter(grid_positions(self.grid, arch.width))
        self.transformer = vit(arch.width, arch.depth, arch.heads)
        self.to_pixels = nn.Linear(arch.width, frames * 3 * arch.patch_size**2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(tokens) + self.token_pos  # [B, N, W]
        queries = self.patch_queries.expand(len(x), -1, -1)  # [B, g², W]
        if self.token_grid is not None:
            a, s = self.token_grid
            cells = rearrange(tokens, "b (a h w) d -> b (a d) h w", a=a, h=s)  # [B, a·D, s, s]
            cells = F.interpolate(cells, size=(self.grid, self.grid), mode="nearest")  # the cell of every patch
            queries = queries + self.cell_proj(rearrange(cells, "b c h w -> b (h w) c"))
        x = torch.cat([x, queries], dim=1)  # [B, N + g², W]
        patches = self.to_pixels(self.transformer(x)[:, -self.grid**2:])  # [B, g², T·3·p²]
        p = self.patch_size
        clips = rearrange(patches, "b (h w) (t c p1 p2) -> b t c (h p1) (w p2)", h=self.grid, t=self.frames, p1=p, p2=p)
        return (clips + 1) / 2


@dataclass
class VQVideoDecoderConfig:
    """The codes it reads (they come from the tokenizer), the clip it makes, and its size."""

    frames: int = 8
    image_size: int = 32
    fps: float = 4.0  # of the decoded clip
    num_tokens: int = 64
    codebook_size: int = 1000
    code_dim: int = 4
    token_grid: tuple[int, int] | None = (4, 4)  # the tokenizer's query grid (a, s); None: a plain sequence
    arch: PixelDecoderArch = field(default_factory=frames_decoder_arch)

    def __post_init__(self):
        check_code_config(self.num_tokens, self.codebook_size, self.code_dim)
        check_vit(self.image_size, self.arch.patch_size, self.arch.width, self.arch.heads)
        if self.frames < 1 or not 0 < self.fps < math.inf:
            raise ValueError(f"need frames >= 1 and a finite fps > 0, got {self.frames}, {self.fps}")
        check_token_grid(self.token_grid, self.num_tokens)


def check_token_grid(token_grid: tuple[int, int] | None, num_tokens: int) -> None:
    """A space-time grid (a, s) holds a·s² tokens, a and s >= 1."""
    if token_grid is not None and (min(token_grid) < 1 or token_grid[0] * token_grid[1] ** 2 != num_tokens):
        raise ValueError(f"token_grid {list(token_grid)} does not hold num_tokens {num_tokens}")


@register
class VQVideoDecoder(CodebookDecoder):
    name = "vq_video"
    modality = "video"
    config_class = VQVideoDecoderConfig

    def __init__(self, config: VQVideoDecoderConfig):
        super().__init__(config)
        c = config
        self.decoder = FramesDecoder(c.frames, c.image_size, c.num_tokens, c.code_dim, c.arch,  # -> [B, T, 3, S, S]
                                     None if c.token_grid is None else tuple(c.token_grid))

    def to_media(self, decoded: torch.Tensor) -> Video:
        return Video.from_tensor(decoded, self.config.fps)
