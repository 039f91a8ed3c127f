"""Video diffusion de-tokenizer: all frames of a clip denoised jointly, cross-attending to the tokens.

    noise [T·3, S, S] ──DiT × steps, cross-attending to tokens [N, D]──> T frames -> clip

The T frames are stacked as channels, so one denoiser sees the whole clip at
every step and every patch token carries its p×p patch through time: motion
is generated jointly with appearance, not frame by frame. The backbone is
diffusers' PixArtTransformer2DModel (adaLN-single timestep conditioning, a
caption projection from the token width, cross-attention to the tokens).

Tokens from a tokenizer with a space-time grid layout (`token_grid` = (a, s):
N = a·s², time-major) are also read as a map: reshaped to [D, a, s, s],
upsampled (nearest) to [D, T, S, S] and stacked as channels beside the
noisy frames, so every pixel of every frame sees the token of its own
space-time cell. Schedulers, CFG and the empty-clip (all-black)
unconditional branch live in `diffusion.py`.

With `prior` (a `PixelDecoderArch` for vq_video's `FramesDecoder`), the DiT
refines a direct decoding of the tokens instead of drawing the clip from
the tokens alone, as a mel refiner sharpens a vocoder's input:

    prior = FramesDecoder(tokens)                         [T·3, S, S]
    x0 = prior + DiT(noisy ⊕ prior ⊕ token map, t, tokens)  (x0-prediction only)

so the untrained DiT already decodes like the prior and learns only the
detail the prior's MSE blurs away. The prior trains on its own MSE beside
the diffusion loss (`training_losses`); recipe `video_divot` pre-trains it
as its stage-1 decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel
from einops import rearrange
from torch import nn

from mllm.detokenizers.base import register
from mllm.detokenizers.diffusion import DiffusionConfig, DiffusionDeTokenizer
from mllm.detokenizers.diffusion_image import DiTArch
from mllm.detokenizers.vq_image import PixelDecoderArch
from mllm.detokenizers.vq_video import FramesDecoder, check_token_grid
from mllm.media import Video


@dataclass
class DiffusionVideoConfig:
    frames: int = 8  # T
    image_size: int = 32  # S
    fps: float = 4.0  # of the decoded clip
    num_tokens: int = 64  # the tokenizer's N
    token_dim: int = 16  # the tokenizer's D
    token_grid: tuple[int, int] | None = (4, 4)  # the tokenizer's query grid (a, s); None: a plain sequence
    dit: DiTArch = field(default_factory=DiTArch)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    prior: PixelDecoderArch | None = None  # a direct decoder whose frames the DiT refines; None: tokens alone

    def __post_init__(self):
        if self.frames < 1 or self.fps <= 0:
            raise ValueError(f"need frames >= 1 and fps > 0, got {self.frames}, {self.fps}")
        if self.image_size % self.dit.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by dit.patch_size {self.dit.patch_size}")
        check_token_grid(self.token_grid, self.num_tokens)
        d = self.diffusion
        if self.prior is not None and (d.scheduler == "flow_matching" or d.prediction_type != "sample"):
            raise ValueError("a prior needs x0-prediction (scheduler ddpm or ddim, prediction_type sample), got "
                             f"{d.scheduler}, {d.prediction_type}")


@register
class DiffusionVideoDeTokenizer(DiffusionDeTokenizer):
    name = "diffusion_video"
    modality = "video"
    config_class = DiffusionVideoConfig

    def __init__(self, config: DiffusionVideoConfig):
        super().__init__(config)
        c, d = config, config.dit
        if c.prior is not None:
            self.prior = FramesDecoder(c.frames, c.image_size, c.num_tokens, c.token_dim, c.prior,
                                       None if c.token_grid is None else tuple(c.token_grid))
        frames_in = 3 * c.frames * (1 if c.prior is None else 2)  # the noisy frames (+ the prior's)
        self.denoiser = PixArtTransformer2DModel(
            num_attention_heads=d.width // d.head_dim,
            attention_head_dim=d.head_dim,
            in_channels=frames_in + (c.token_dim * c.frames if c.token_grid is not None else 0),
            out_channels=3 * c.frames,
            num_layers=d.depth,
            cross_attention_dim=d.width,
            sample_size=c.image_size,
            patch_size=d.patch_size,
            caption_channels=c.token_dim,
            use_additional_conditions=False,
        )
        if c.prior is not None:  # a zero correction at first: the untrained de-tokenizer decodes as its prior
            nn.init.zeros_(self.denoiser.proj_out.weight)
            nn.init.zeros_(self.denoiser.proj_out.bias)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3 * self.config.frames, self.config.image_size, self.config.image_size)

    def prior_frames(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, D] -> the prior's clips [B, T·3, S, S] in [-1, 1] (unclamped)."""
        return rearrange(self.prior(tokens), "b t c h w -> b (t c) h w") * 2 - 1

    def conditioning(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens, the prior's frames or None): the prior decodes once per clip, not once per denoising step."""
        return tokens, None if self.config.prior is None else self.prior_frames(tokens)

    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor,
                tokens: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        c = self.config
        tokens, prior = tokens
        if prior is not None:
            sample = torch.cat([sample, prior], dim=1)
        if c.token_grid is not None:
            a, s = c.token_grid
            token_map = rearrange(tokens, "b (a h w) d -> b d a h w", a=a, h=s)  # [B, D, a, s, s]
            token_map = F.interpolate(token_map, size=(c.frames, c.image_size, c.image_size), mode="nearest")
            sample = torch.cat([sample, rearrange(token_map, "b d t h w -> b (t d) h w")], dim=1)
        no_extra = {"resolution": None, "aspect_ratio": None}
        out = self.denoiser(sample, encoder_hidden_states=tokens, timestep=timesteps, added_cond_kwargs=no_extra).sample
        return out if prior is None else prior + out  # x0: the prior's frames plus the DiT's correction

    def training_losses(
        self, clips: torch.Tensor, tokens: torch.Tensor, null_tokens: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """clips [B, T, 3, S, S] in [0, 1], tokens [B, N, D] -> {"loss": diffusion loss (+ the prior's MSE), terms}."""
        x0 = rearrange(clips, "b t c h w -> b (t c) h w") * 2 - 1
        conditioned = self.conditioning(tokens)  # the prior's frames serve the DiT and their own MSE
        diffusion = self.diffusion_loss(x0, tokens, null_tokens, conditioned)
        if self.config.prior is None:
            return {"loss": diffusion}
        prior_mse = F.mse_loss(conditioned[1], x0)
        return {"loss": diffusion + prior_mse, "diffusion": diffusion, "prior_mse": prior_mse}

    def to_media(self, sample: torch.Tensor) -> Video:
        frames = rearrange(sample, "(t c) h w -> t c h w", t=self.config.frames)
        return Video.from_tensor((frames + 1) / 2, self.config.fps)
