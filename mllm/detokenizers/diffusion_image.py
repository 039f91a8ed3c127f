"""Image diffusion de-tokenizer: a diffusers denoiser over pixels that cross-attends to the tokens.

    noise [3, S, S] ──denoiser × steps, cross-attending to tokens [N, D]──> image

Tokens from a tokenizer with a grid layout (N = g², row-major over the
image) are also read as a map: reshaped to [D, g, g], upsampled (nearest) to
S×S and concatenated to the noisy image as input channels, so every pixel
sees the token of its own region without having to learn where to look
(the conditioning of SR3 and of diffusion decoders of autoencoders).

Two backbones from diffusers, chosen by `backbone`:
- "dit": a DiT with cross-attention (PixArtTransformer2DModel: p×p pixel
  patches, adaLN-single timestep conditioning, a caption projection that
  maps the tokens to its width). Matmul-bound, so cheap on CPUs; the tiny
  recipe uses it.
- "unet": UNet2DConditionModel, the tokens projected by its
  `encoder_hid_proj` and their mean added to the timestep embedding (a
  "projection" class embedding), so every resolution sees a summary.

Pixels are denoised directly: the images this targets are small; at real
scale the same configs grow (`tokenizers/*_real.yaml`). Schedulers, CFG
and the empty-image unconditional branch live in `diffusion.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel
from einops import rearrange

from mllm.detokenizers.base import register
from mllm.detokenizers.diffusion import DiffusionConfig, DiffusionDeTokenizer
from mllm.media import Image


@dataclass
class DiTArch:
    patch_size: int = 4
    width: int = 128  # = heads × head_dim
    depth: int = 4
    head_dim: int = 32

    def __post_init__(self):
        if self.width % self.head_dim:
            raise ValueError(f"dit.width {self.width} must be divisible by dit.head_dim {self.head_dim}")


@dataclass
class UNetArch:
    channels: tuple[int, ...] = (32, 64, 64)  # per resolution, high to low
    cross_attention: tuple[bool, ...] = (False, True, True)  # attend to the tokens at this resolution
    layers_per_block: int = 1
    head_dim: int = 8
    cross_dim: int = 64  # tokens are projected to this width

    def __post_init__(self):
        if len(self.cross_attention) != len(self.channels):
            raise ValueError(f"unet.cross_attention has {len(self.cross_attention)} entries, channels {len(self.channels)}")
        if not any(self.cross_attention):
            raise ValueError("unet.cross_attention must be true at one resolution at least: the tokens are the condition")


@dataclass
class DiffusionImageConfig:
    image_size: int = 32
    num_tokens: int = 64  # the tokenizer's N
    token_dim: int = 64  # the tokenizer's D
    layout: Literal["grid", "sequence"] = "sequence"  # the tokenizer's; "grid" tokens are also a spatial map
    backbone: Literal["dit", "unet"] = "dit"
    dit: DiTArch = field(default_factory=DiTArch)  # used when backbone == "dit"
    unet: UNetArch = field(default_factory=UNetArch)  # used when backbone == "unet"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def __post_init__(self):
        if self.layout == "grid" and math.isqrt(self.num_tokens) ** 2 != self.num_tokens:
            raise ValueError(f"grid tokens must be a square number, got {self.num_tokens}")
        if self.backbone == "dit" and self.image_size % self.dit.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by dit.patch_size {self.dit.patch_size}")
        if self.backbone == "unet" and self.image_size % 2 ** (len(self.unet.channels) - 1):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2^(len(unet.channels) - 1)")


def in_channels(c: DiffusionImageConfig) -> int:
    """The noisy image, and the token map for grid tokens."""
    return 3 + (c.token_dim if c.layout == "grid" else 0)


def build_dit(c: DiffusionImageConfig) -> PixArtTransformer2DModel:
    d = c.dit
    return PixArtTransformer2DModel(
        num_attention_heads=d.width // d.head_dim,
        attention_head_dim=d.head_dim,
        in_channels=in_channels(c),
        out_channels=3,
        num_layers=d.depth,
        cross_attention_dim=d.width,
        sample_size=c.image_size,
        patch_size=d.patch_size,
        caption_channels=c.token_dim,
        use_additional_conditions=False,  # no PixArt size/aspect conditioning
    )


def build_unet(c: DiffusionImageConfig) -> UNet2DConditionModel:
    u = c.unet
    return UNet2DConditionModel(
        sample_size=c.image_size,
        in_channels=in_channels(c),
        out_channels=3,
        block_out_channels=u.channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.cross_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.cross_attention)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=u.layers_per_block,
        norm_num_groups=min(8, *u.channels),
        attention_head_dim=u.head_dim,
        cross_attention_dim=u.cross_dim,
        encoder_hid_dim=c.token_dim,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=c.token_dim,
    )


@register
class DiffusionImageDeTokenizer(DiffusionDeTokenizer):
    name = "diffusion_image"
    modality = "image"
    config_class = DiffusionImageConfig

    def __init__(self, config: DiffusionImageConfig):
        super().__init__(config)
        self.denoiser = build_dit(config) if config.backbone == "dit" else build_unet(config)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.config.image_size, self.config.image_size)

    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.layout == "grid":
            side = math.isqrt(self.config.num_tokens)
            token_map = rearrange(tokens, "b (h w) d -> b d h w", h=side)  # [B, D, g, g]
            sample = torch.cat([sample, F.interpolate(token_map, size=sample.shape[-2:], mode="nearest")], dim=1)
        if self.config.backbone == "dit":
            no_extra = {"resolution": None, "aspect_ratio": None}
            return self.denoiser(sample, encoder_hidden_states=tokens, timestep=timesteps, added_cond_kwargs=no_extra).sample
        return self.denoiser(sample, timesteps, encoder_hidden_states=tokens, class_labels=tokens.mean(dim=1)).sample

    def training_losses(
        self, pixels: torch.Tensor, tokens: torch.Tensor, null_tokens: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """pixels [B, 3, S, S] in [0, 1], tokens [B, N, D] -> {"loss": diffusion loss}."""
        return {"loss": self.diffusion_loss(pixels * 2 - 1, tokens, null_tokens)}

    def to_media(self, sample: torch.Tensor) -> Image:
        return Image.from_tensor((sample + 1) / 2)
