"""Continuous video tokenizer in the Divot style: a clip to N feature tokens.

    clip -> T frames sampled evenly, resized to S×S                     [T, 3, S, S]
         -> per-frame patch features (patch encoder, or a frozen
            CLIP/SigLIP tower read from a local directory)              [T, g², W]    g = S / p
         -> temporal transformer (each patch position across time)      [T, g², W]
         -> spatial pooling to k×k per frame                            [T·k², W]
         -> spatio-temporal transformer blocks over all of them         [T·k², W]
         -> Perceiver resampler: N learned queries                      [N, D]   per-token layer-normalised

Divot reads 5 frames of a 2 s clip with a frozen ViT, pools to 5×5 and
resamples to 64 tokens × 256-d. With `query_grid` = (a, s), the N = a·s²
queries tile the clip as a time × space grid and a fixed additive attention
bias starts each one reading its own space-time cell (as `resampler_image`
does for images), so tiny models need not discover where to look; tokens
then come out cell by cell (layout "grid"). None leaves the queries free.

The tokens are trained as the condition of the `diffusion_video`
de-tokenizer (recipe `video_divot`); `video_divot_fsq` quantises them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid
from einops import rearrange
from torch import nn

from mllm.config import ConfigError
from mllm.media import MediaError, Video, even_indices
from mllm.tokenizers.base import MediaTokenizer, register
from mllm.tokenizers.fsq_image import check_stem, check_vit, grid_positions, patch_stem, vit
from mllm.tokenizers.hf_vision import FAMILIES, HFVisionConfig, _family, _from_directory, check_layer
from mllm.tokenizers.resampler_image import Resampler


def sample_frames(video: Video, frames: int, size: int) -> torch.Tensor:
    """`frames` evenly spaced frames (repeating when the clip is shorter), bicubic-resized: [T, 3, size, size] in [0, 1]."""
    clip = Video(video.frames[even_indices(video.num_frames, frames)], video.fps)
    if (clip.height, clip.width) != (size, size):
        clip = clip.resize(size)
    return clip.to_tensor()


def clip_batch(videos: list[Video], frames: int, size: int, who: str) -> torch.Tensor:
    """Videos of any length and size -> [B, T, 3, S, S] in [0, 1]; refuses non-videos and empty lists."""
    if not isinstance(videos, (list, tuple)) or not videos:
        raise ValueError(f"{who}: expected a non-empty list of Videos, got {videos!r:.60}")
    for i, video in enumerate(videos):
        if not isinstance(video, Video):
            raise MediaError(f"<{who}>", f"item {i}: expected a Video, got {type(video).__name__}")
    return torch.stack([sample_frames(v, frames, size) for v in videos])


def time_positions(frames: int, width: int) -> torch.Tensor:
    """[frames, width] 1D sin-cos embeddings: an init for learned time positions."""
    return get_1d_sincos_pos_embed_from_grid(width, torch.arange(frames, dtype=torch.float64)).float()


def spacetime_bias(query_grid: tuple[int, int], frames: int, pool: int) -> torch.Tensor:
    """[a·s², T·k²] additive attention bias from an a×s×s query grid to the T×k×k pooled features, both
    (time, row, column)-major over the same clip: −Σ (Δ / σ)² / 2 per axis, σ = half a query cell."""
    a, s = query_grid

    def centres(n: int) -> torch.Tensor:
        return (torch.arange(n) + 0.5) / n

    q = torch.stack(torch.meshgrid(centres(a), centres(s), centres(s), indexing="ij"), -1).reshape(-1, 3)
    f = torch.stack(torch.meshgrid(centres(frames), centres(pool), centres(pool), indexing="ij"), -1).reshape(-1, 3)
    sigma = 0.5 / torch.tensor([a, s, s], dtype=torch.float32)
    return -(((q[:, None] - f[None]) / sigma) ** 2).sum(-1) / 2


@dataclass
class VideoDivotConfig:
    frames: int = 8  # frames sampled per clip, evenly spaced
    image_size: int = 32  # frame side S (patch encoder; a vision tower uses its own)
    patch_size: int = 4
    width: int = 64  # W of every transformer here
    heads: int = 4
    spatial_depth: int = 1  # patch encoder: ViT layers within each frame
    temporal_depth: int = 1  # layers across time at each patch position
    pool: int = 4  # k: k×k features per frame after pooling
    spacetime_depth: int = 1  # layers over all T·k² pooled features
    num_tokens: int = 64  # N
    feature_dim: int = 16  # D of each token
    query_grid: tuple[int, int] | None = (4, 4)  # (a, s): N = a·s² queries on a time × space grid; None: free
    resampler_depth: int = 2
    stem: str = "patch"  # patch encoder: "patch" (one linear projection per patch) or "conv" (strided 3×3 convolutions)
    vision_path: str = ""  # a local CLIP/SigLIP directory: its frozen tower replaces the patch encoder
    vision_layer: int = -2  # which hidden state of the tower
    # filled in from `vision_path` on first build; a saved tokenizer is rebuilt from these alone
    vision_config: dict[str, Any] | None = None  # the tower's HF config
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None

    def __post_init__(self):
        if self.frames < 1 or self.pool < 1 or self.num_tokens < 1 or self.feature_dim < 1:
            raise ValueError(f"need frames, pool, num_tokens and feature_dim >= 1, got {self.frames}, {self.pool}, "
                             f"{self.num_tokens}, {self.feature_dim}")
        check_vit(self.image_size, self.patch_size, self.width, self.heads)
        check_stem(self.stem, self.patch_size)
        if self.query_grid is not None and (min(self.query_grid) < 1 or
                                            self.query_grid[0] * self.query_grid[1] ** 2 != self.num_tokens):
            raise ValueError(f"query_grid {list(self.query_grid)} makes {self.query_grid[0] * self.query_grid[1] ** 2} "
                             f"queries, not num_tokens {self.num_tokens}")

    @property
    def uses_vision_tower(self) -> bool:
        return bool(self.vision_path) or self.vision_config is not None


def _vision_tower(config: VideoDivotConfig) -> tuple[nn.Module, VideoDivotConfig, int]:
    """The frozen CLIP/SigLIP tower, the config with its HF config and normalisation, and its count of non-patch tokens."""
    encoder = None
    if config.vision_config is None:
        encoder, resolved = _from_directory(HFVisionConfig(path=config.vision_path), "vision_path")
        config = dataclasses.replace(config, vision_config=resolved.encoder, image_mean=resolved.image_mean,
                                     image_std=resolved.image_std)
    config_cls, model_cls, _, _, extra = FAMILIES[_family(config.vision_config.get("model_type", ""), "vision_config",
                                                          "video_divot tower")]
    if encoder is None:
        encoder = model_cls(config_cls.from_dict(config.vision_config))
    check_layer(encoder, config.vision_layer, "vision_layer")
    return encoder.eval().requires_grad_(False), config, extra


@register
class VideoDivotTokenizer(MediaTokenizer):
    name = "video_divot"
    modality = "video"
    kind = "continuous"
    config_class = VideoDivotConfig

    def __init__(self, config: VideoDivotConfig):
        tower, extra = None, 0
        if config.uses_vision_tower:
            tower, config, extra = _vision_tower(config)
        super().__init__(config)
        c = config
        if tower is not None:
            self.tower, self.tower_extra = tower, extra
            e = tower.config
            self.frame_size, grid = e.image_size, e.image_size // e.patch_size
            self.tower_proj = nn.Linear(e.hidden_size, c.width)
            self.register_buffer("mean", torch.tensor(c.image_mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(c.image_std).view(1, 3, 1, 1), persistent=False)
        else:
            self.frame_size, grid = c.image_size, c.image_size // c.patch_size
            self.embed = patch_stem(c.stem, c.image_size, c.patch_size, c.width)
            self.spatial = vit(c.width, c.spatial_depth, c.heads)
        if c.pool > grid:
            raise ConfigError("pool", f"{c.pool} is larger than the {grid}×{grid} patch grid")
        self.grid = grid
        self.time_pos = nn.Parameter(time_positions(c.frames, c.width))  # [T, W]
        self.temporal = vit(c.width, c.temporal_depth, c.heads)
        st_pos = time_positions(c.frames, c.width)[:, None] + grid_positions(c.pool, c.width)[None]  # [T, k², W]
        self.spacetime_pos = nn.Parameter(st_pos.reshape(-1, c.width))
        self.spacetime = vit(c.width, c.spacetime_depth, c.heads)
        self.resampler = Resampler(c.width, c.num_tokens, c.feature_dim, c.width, c.resampler_depth, c.heads)
        if c.query_grid is not None:
            self.resampler.bias = spacetime_bias(tuple(c.query_grid), c.frames, c.pool)

    def train(self, mode: bool = True) -> VideoDivotTokenizer:
        super().train(mode)
        if self.config.uses_vision_tower:
            self.tower.eval()  # frozen: never in training mode
        return self

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def layout(self) -> str:
        return "sequence" if self.config.query_grid is None else "grid"

    @property
    def load_options(self) -> dict[str, int]:
        return {"even_frames": self.config.frames}  # the frames `sample_frames` takes from the whole clip

    def num_tokens(self, media: Video) -> int:
        return self.config.num_tokens

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [F, 3, S, S] in [0, 1] -> patch features [F, g², W]."""
        if not self.config.uses_vision_tower:
            return self.spatial(self.embed(frames))
        with torch.no_grad():
            hidden = self.tower(pixel_values=(frames - self.mean) / self.std, output_hidden_states=True)
            patches = hidden.hidden_states[self.config.vision_layer][:, self.tower_extra:]  # [F, g², H]
        return self.tower_proj(patches)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """clips [B, T, 3, S, S] in [0, 1] -> tokens [B, N, D] (differentiable: the recipe trains through it)."""
        b, t = clips.shape[:2]
        x = self.frame_features(clips.flatten(0, 1))  # [B·T, g², W]
        x = rearrange(x, "(b t) p w -> (b p) t w", b=b) + self.time_pos
        x = rearrange(self.temporal(x), "(b h v) t w -> (b t) w h v", b=b, h=self.grid)  # [B·T, W, g, g]
        x = F.adaptive_avg_pool2d(x, self.config.pool)  # [B·T, W, k, k]
        x = rearrange(x, "(b t) w h v -> b (t h v) w", b=b) + self.spacetime_pos  # [B, T·k², W]
        return self.resampler(self.spacetime(x))

    @torch.no_grad()
    def encode_batch(self, videos: list[Video]) -> torch.Tensor:
        """FloatTensor [B, N, D]."""
        tokens = self.features(clip_batch(videos, self.config.frames, self.frame_size, self.name))
        if not torch.isfinite(tokens).all():
            raise FloatingPointError(f"{self.name}: the encoder produced NaN or inf features (are its weights intact?)")
        return tokens

    def encode(self, media: Video) -> torch.Tensor:
        return self.encode_batch([media])[0]
