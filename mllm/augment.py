"""Random geometric jitter of image batches, so that encoders trained on a few thousand images read new ones:
other hands, other framings. One random affine map (rotation, scale, shift) per image, drawn from the global
torch RNG (seeded runs stay reproducible).

    jitter(pixels [B, C, H, W], AffineJitter(rotate_degrees=12, translate=0.08, scale=(0.9, 1.1))) -> [B, C, H, W]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AffineJitter:
    rotate_degrees: float = 0.0  # uniform in ±this
    translate: float = 0.0  # uniform shift in ±this fraction of the side, per axis
    scale: tuple[float, float] = (1.0, 1.0)  # uniform zoom range (> 1 enlarges the content)

    def __post_init__(self):
        self.scale = tuple(self.scale)
        if not (0 <= self.rotate_degrees <= 180 and 0 <= self.translate < 0.5):
            raise ValueError(f"augment: need 0 <= rotate_degrees <= 180 and 0 <= translate < 0.5, got "
                             f"{self.rotate_degrees}, {self.translate}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"augment: scale must be a range (low, high) with 0 < low <= high, got {self.scale}")

    @property
    def enabled(self) -> bool:
        return self.rotate_degrees > 0 or self.translate > 0 or self.scale != (1.0, 1.0)


def jitter(pixels: torch.Tensor, cfg: AffineJitter) -> torch.Tensor:
    """pixels [B, C, H, W] -> the same batch, each image under its own random affine map (edges repeat outward)."""
    if not cfg.enabled:
        return pixels
    b = len(pixels)
    angle = (torch.rand(b) * 2 - 1) * math.radians(cfg.rotate_degrees)
    zoom = cfg.scale[0] + torch.rand(b) * (cfg.scale[1] - cfg.scale[0])
    shift = (torch.rand(b, 2) * 2 - 1) * cfg.translate * 2  # affine_grid's frame spans [-1, 1]: a side is 2
    cos, sin = angle.cos() / zoom, angle.sin() / zoom  # the grid samples the input: the inverse map
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], -1), torch.stack([sin, cos, shift[:, 1]], -1)], 1)
    grid = F.affine_grid(theta.to(pixels), list(pixels.shape), align_corners=False)  # [B, H, W, 2]
    return F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)
