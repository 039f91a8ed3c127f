"""A diffusion de-tokenizer for continuous audio latents: latents -> mel spectrogram -> waveform.

    latents [D, N] ──coarse decoder (the mel autoencoder's)──▶ coarse mel μ [M, N · r]   (r mel frames per latent)
                   ──transposed conv──────────────────────────▶ features [C, N · r]
    noise [M, N · r] ──UNet1D(noisy residual ⊕ μ ⊕ features, t), v-prediction, DPM-Solver++──▶ residual x [M, N · r]
    log-mel = μ + residual_std · x ──Griffin-Lim (librosa)──▶ waveform [N · r · hop]

As in Grad-TTS, a coarse, deterministic mel μ comes first: the decoder of
the mel autoencoder whose encoder is the tokenizer, trained with it and then
frozen. The diffusion model only generates the residual an L1 decoder blurs
away (harmonics, noise texture), scaled to unit spread by `residual_std`
(measured by the recipe), so it trains in minutes and a weak one cannot do
much harm. The denoiser is diffusers' 1-D UNet with temporal residual blocks
(from Janner et al.'s planner), with mel bins as channels.

Training drops the condition with probability `p_uncond` and puts the
latents of silence (`null_latent`, set from the tokenizer by the recipe) in
its place: that is the unconditional branch of classifier-free guidance, as
in Divot. `decode(guidance=g, steps=s)` exposes both. The waveform stage is
librosa's Griffin-Lim over the mel's pseudo-inverse linear spectrum, so it
needs no training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import librosa
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet1DModel
from torch import nn

from mllm.detokenizers.base import DeTokenizer, register
from mllm.media import Audio
from mllm.tokenizers.mel_latent import LogMel, MelLatentConfig, convnext_stack


@dataclass
class MelDiffusionConfig:
    latents: MelLatentConfig = field(default_factory=MelLatentConfig)  # the tokenizer whose latents condition this
    channels: list[int] = field(default_factory=lambda: [96, 128, 192])  # UNet widths, one level each: multiples of 8
    cond_channels: int = 32
    train_timesteps: int = 1000
    steps: int = 10  # default sampling steps
    guidance: float = 1.0  # classifier-free guidance scale when decode() is not given one; 1: none
    p_uncond: float = 0.1
    griffin_lim_iters: int = 32

    def __post_init__(self):
        if len(self.channels) < 2 or not 0 <= self.p_uncond < 1 or self.steps < 1 or self.guidance < 0:
            raise ValueError(f"need >= 2 UNet levels, 0 <= p_uncond < 1, steps >= 1 and guidance >= 0, got "
                             f"{self.channels}, {self.p_uncond}, {self.steps}, {self.guidance}")
        if any(c < 8 or c % 8 for c in self.channels):  # the UNet's GroupNorm splits each level into 8 groups
            raise ValueError(f"channels must be multiples of 8, got {self.channels}")
        if self.cond_channels < 1 or self.train_timesteps < 2 or self.griffin_lim_iters < 0:
            raise ValueError(f"need cond_channels >= 1, train_timesteps >= 2 and griffin_lim_iters >= 0, got "
                             f"{self.cond_channels}, {self.train_timesteps}, {self.griffin_lim_iters}")


@register
class MelDiffusionDecoder(DeTokenizer):
    name = "diffusion_mel"
    modality = "audio"
    kind = "continuous"
    config_class = MelDiffusionConfig

    def __init__(self, config: MelDiffusionConfig):
        super().__init__(config)
        c, lat = config, config.latents
        n_mels, r = lat.mel.n_mels, lat.downsample
        self.mel = LogMel(lat.mel)
        self.coarse = nn.Sequential(  # [B, D, N] -> [B, M, N · r]
            nn.ConvTranspose1d(lat.latent_dim, lat.channels, r, stride=r),
            convnext_stack(lat.channels, lat.channels, lat.depth, n_mels),
        )
        self.cond = nn.ConvTranspose1d(lat.latent_dim, c.cond_channels, r, stride=r)
        self.unet = UNet1DModel(
            in_channels=2 * n_mels + c.cond_channels, out_channels=n_mels,
            block_out_channels=tuple(c.channels), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownResnetBlock1D",) * len(c.channels),
            up_block_types=("UpResnetBlock1D",) * (len(c.channels) - 1),
            mid_block_type="MidResTemporalBlock1D", out_block_type="OutConv1DBlock",
            use_timestep_embedding=True, time_embedding_type="positional", act_fn="mish",
        )
        self.scheduler = DDPMScheduler(c.train_timesteps, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
        self.register_buffer("null_latent", torch.zeros(lat.latent_dim))  # the latent of silence: set by the recipe
        self.register_buffer("residual_std", torch.ones(()))  # spread of mel - μ: set by the recipe
        self.register_buffer("inverse_basis", torch.linalg.pinv(self.mel.basis), persistent=False)  # [n_fft / 2 + 1, M]

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """noisy residual [B, M, F], timesteps [B], latents (or null latents) [B, D, N], F = N · r -> v [B, M, F]."""
        x = torch.cat([noisy, self.coarse(latents), self.cond(latents)], dim=1)
        frames, multiple = noisy.shape[-1], 2 ** (len(self.config.channels) - 1)
        x = F.pad(x, (0, -frames % multiple), mode="replicate")  # the UNet halves the length len(channels) - 1 times
        return self.unet(x, t).sample[..., :frames]

    def training_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch: normalised log-mel "mel" [B, M, F] and "latents" [B, D, N] -> v-prediction MSE on the residual."""
        mel, latents = batch["mel"], batch["latents"]
        residual = (mel - self.coarse(latents)) / self.residual_std
        drop = torch.rand(len(latents), device=mel.device) < self.config.p_uncond
        latents = torch.where(drop[:, None, None], self.null_latent[:, None].expand_as(latents), latents)
        noise = torch.randn_like(residual)
        t = torch.randint(0, self.config.train_timesteps, (len(mel),), device=mel.device)
        noisy = self.scheduler.add_noise(residual, noise, t)
        return {"loss": F.mse_loss(self(noisy, t, latents), self.scheduler.get_velocity(residual, noise, t))}

    @property
    def guidance(self) -> float:
        return self.config.guidance

    @torch.no_grad()
    def render_mel(self, latents: torch.Tensor, *, guidance: float | None = None, steps: int | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents [B, D, N] -> normalised log-mel [B, M, N · r]: μ plus a residual sampled with DPM-Solver++ and CFG."""
        steps = self.config.steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"{self.name}: steps must be >= 1, got {steps}")
        sampler = DPMSolverMultistepScheduler.from_config(self.scheduler.config)
        sampler.set_timesteps(steps)
        guidance = self.resolve_guidance(guidance)
        frames = latents.shape[-1] * self.config.latents.downsample
        # drawn on the CPU (where `generator` lives), so a seed gives the same noise on every device
        x = torch.randn(len(latents), self.config.latents.mel.n_mels, frames, generator=generator).to(latents.device)
        null = self.null_latent[None, :, None].expand_as(latents)
        for t in sampler.timesteps:
            ts = t.expand(len(x)).to(x.device)  # the UNet embeds [B] timesteps where they are
            if guidance == 1.0:
                v = self(x, ts, latents)
            else:
                v_cond, v_null = self(torch.cat([x, x]), torch.cat([ts, ts]), torch.cat([latents, null])).chunk(2)
                v = v_null + guidance * (v_cond - v_null)
            x = sampler.step(v, t, x).prev_sample
        return self.coarse(latents) + self.residual_std * x

    def griffin_lim(self, mel: torch.Tensor, seed: int) -> torch.Tensor:
        """Normalised log-mel [M, F] -> waveform [F · hop]: mel -> linear magnitude (pseudo-inverse) -> Griffin-Lim."""
        c = self.config.latents.mel
        magnitude = self.mel.denormalize(F.pad(mel, (0, 1), mode="replicate")).exp()  # F + 1 centred frames: F · hop samples
        linear = (self.inverse_basis @ magnitude).clamp(min=c.floor).cpu().numpy()  # [n_fft / 2 + 1, F + 1]
        wave = librosa.griffinlim(linear, n_iter=self.config.griffin_lim_iters, hop_length=c.hop_length,
                                  win_length=c.win_length, length=mel.shape[-1] * c.hop_length, random_state=seed)
        return torch.from_numpy(wave)

    def decode(self, tokens: torch.Tensor, *, guidance: float | None = None, steps: int | None = None,
               generator: torch.Generator | None = None) -> Audio:
        dim = self.config.latents.latent_dim
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[1] != dim or not len(tokens):
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"{self.name}: expected latents [N, {dim}] with N >= 1, got {shape}")
        if not torch.isfinite(tokens).all():
            raise ValueError(f"{self.name}: latents [{len(tokens)}, {dim}] contain NaN or inf")
        latents = tokens.float().T[None].to(self.null_latent.device)  # [1, D, N] on this de-tokenizer's device
        mel = self.render_mel(latents, guidance=guidance, steps=steps, generator=generator)[0]
        seed = int(torch.randint(2**31, (1,), generator=generator))
        return Audio(self.griffin_lim(mel, seed).clamp(-1, 1).numpy()[None], self.config.latents.mel.sample_rate)
