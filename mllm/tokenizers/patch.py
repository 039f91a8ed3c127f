"""Raw-patch image tokenizer (Fuyu-style): no weights, no training.

An image is resized to `image_size`², cut into `patch_size`² patches, and each
patch's pixels, scaled to [-1, 1], become one feature vector. The LM's input
projector does all the learning. It is the simplest honest continuous
tokenizer and the baseline the learned ones must beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from mllm.media import Image, MediaError
from mllm.tokenizers.base import MediaTokenizer, register


@dataclass
class PatchConfig:
    image_size: int = 32
    patch_size: int = 8

    def __post_init__(self):
        if self.image_size <= 0 or self.patch_size <= 0 or self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of patch_size {self.patch_size}")


@register
class PatchTokenizer(MediaTokenizer):
    name = "patch"
    modality = "image"
    kind = "continuous"
    config_class = PatchConfig

    @property
    def feature_dim(self) -> int:
        return 3 * self.config.patch_size**2

    def num_tokens(self, media: Image) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    @torch.no_grad()
    def encode(self, media: Image) -> torch.Tensor:
        if not isinstance(media, Image):
            raise MediaError("<patch tokenizer>", f"expected an Image, got {type(media).__name__}")
        pixels = media.resize(self.config.image_size).to_tensor() * 2 - 1  # [3, S, S] in [-1, 1]
        p = self.config.patch_size
        return rearrange(pixels, "c (h p1) (w p2) -> (h w) (c p1 p2)", p1=p, p2=p)  # [N, 3p²]

    def decode(self, features: torch.Tensor) -> Image:
        """The exact inverse of `encode` (at `image_size`): features [N, 3p²] -> Image."""
        p, side = self.config.patch_size, self.config.image_size // self.config.patch_size
        if not isinstance(features, torch.Tensor) or not features.dtype.is_floating_point:
            kind = features.dtype if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"{self.name}: expected float features, got {kind}")
        if features.shape != (side * side, self.feature_dim):
            raise ValueError(f"expected features [{side * side}, {self.feature_dim}], got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError(f"{self.name}: features contain NaN or inf")
        pixels = rearrange(features, "(h w) (c p1 p2) -> c (h p1) (w p2)", h=side, p1=p, p2=p)
        return Image.from_tensor((pixels.float() + 1) / 2)
