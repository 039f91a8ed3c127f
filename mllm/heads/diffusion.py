"""Diffusion head (MAR): a small denoiser, conditioned on the hidden state, models p(feature | hidden).

    x_t [M, D], t, hidden [M, H] ──SimpleMLPAdaLN──▶ prediction [M, D]
        y = TimestepEmbedder(t) + Linear(hidden);   residual MLP blocks modulated by y (adaLN)

Two processes, chosen by `sampler`:

- "ddim": ε-prediction on a cosine schedule of `train_steps` discrete times
  (MAR), sampled by DDIM on `steps` evenly spaced times. `eta` = 1 (the
  default) is DDPM's ancestral sampler, which MAR uses; `eta` = 0 is the
  deterministic ODE, which needs a much better-trained ε to stay on the
  data (with a short training run its covariance errors grow with the step
  count). The times are "leading" (10 steps: 900, 800, ..., 0): the capped
  last β of the cosine schedule leaves ᾱ(999) ≈ 2e-9, and a step from there
  would multiply the ε error by ~3000.
- "flow": rectified flow, x_t = (1 − t)·x + t·ε, predicting the velocity
  ε − x; sampled by Euler steps from t = 1 to 0.

Training repeats each target `batch_multiplier` times with fresh noise and
times (MAR's diffusion_batch_mul). Temperature scales the noise a sampler
draws along the way: DDIM's per-step noise, as in MAR (so none at `eta` = 0),
and the flow's starting noise, its only draw. Guidance mixes the two
predictions of one batched forward, as MAR does on ε.

The schedule is recomputed from its formula on each call (a thousand float64
products), so the head holds no buffers. The process itself (noise, ᾱ, the
sampler's steps) runs in fp32 whatever the LM's dtype, and only the net in
the head's dtype: bf16 rounds ᾱ near t = 0 to 1. It is written here rather
than taken from diffusers: an MLP head needs about thirty lines of it, and
`mllm.model` must import without diffusers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mllm.heads.base import Head, both_streams, guide, register, sampling_temperature, split_guidance

Sampler = Literal["ddim", "flow"]


@dataclass
class DiffusionHeadConfig:
    hidden_size: int  # H, the LM's hidden size
    feature_dim: int  # D
    width: int = 1024
    depth: int = 3  # residual adaLN blocks
    sampler: Sampler = "ddim"  # also fixes the training objective, see the module docstring
    train_steps: int = 1000  # discrete diffusion times of the cosine schedule ("ddim")
    batch_multiplier: int = 4
    steps: int = 100  # sampling steps, unless `sample(steps=...)` says otherwise
    eta: float = 1.0  # DDIM noise: 1 DDPM's ancestral sampler, 0 the deterministic ODE
    temperature: float = 1.0  # sample()'s default: scales the noise the sampler draws

    def __post_init__(self):
        sizes = ("hidden_size", "feature_dim", "width", "depth", "train_steps", "batch_multiplier", "steps")
        if min(getattr(self, s) for s in sizes) <= 0:
            raise ValueError(f"{', '.join(sizes)} must be positive")
        if self.sampler == "ddim" and self.steps > self.train_steps:
            raise ValueError(f"steps ({self.steps}) cannot exceed train_steps ({self.train_steps})")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")


def cosine_alpha_bar(t: torch.Tensor, train_steps: int) -> torch.Tensor:
    """ᾱ at integer times t in [-1, train_steps) of the cosine schedule ("squaredcos_cap_v2"); ᾱ(-1) = 1.

    β_i = min(1 − f(i + 1) / f(i), 0.999),  f(s) = cos²((s / T + 0.008) / 1.008 · π/2),
    ᾱ_t = Π_{i ≤ t} (1 − β_i).
    """
    s = torch.arange(train_steps + 1, dtype=torch.float64) / train_steps
    f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    alpha_bar = torch.cumprod(1 - (1 - f[1:] / f[:-1]).clamp(max=0.999), 0)
    alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar])  # index 0 is t = -1
    return alpha_bar.to(t.device)[t + 1].float()


class TimestepEmbedder(nn.Module):
    """Scalar times [M] -> [M, width]: sinusoidal frequencies, then an MLP (DiT/MAR)."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate · MLP(LayerNorm(x) · (1 + scale) + shift), with (shift, scale, gate) from the condition y."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
    """MAR's denoiser: prediction [M, D] from x_t [M, D], time [M] and condition [M, H]."""

    def __init__(self, config: DiffusionHeadConfig):
        super().__init__()
        self.time_embed = TimestepEmbedder(config.width)
        self.cond_embed = nn.Linear(config.hidden_size, config.width)
        self.input_proj = nn.Linear(config.feature_dim, config.width)
        self.blocks = nn.ModuleList(ResBlock(config.width) for _ in range(config.depth))
        self.final = FinalLayer(config.width, config.feature_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        y = self.time_embed(t) + self.cond_embed(cond)
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, y)
        return self.final(h, y)


@register
class DiffusionHead(Head):
    name = "diffusion"
    config_class = DiffusionHeadConfig

    def __init__(self, config: DiffusionHeadConfig):
        super().__init__(config)
        self.net = SimpleMLPAdaLN(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAR's initialisation: Xavier linears, N(0, 0.02) time MLP, zero modulations and output layer."""
        for module in self.net.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.net.time_embed.mlp[0], self.net.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        zeroed = [block.modulation[-1] for block in self.net.blocks]
        for layer in zeroed + [self.net.final.modulation[-1], self.net.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cond = hidden.repeat(self.config.batch_multiplier, 1)  # [m·M, H]
        x = target.float().repeat(self.config.batch_multiplier, 1)  # [m·M, D], fp32: see _denoise
        noise = torch.randn_like(x)
        if self.config.sampler == "ddim":
            t = torch.randint(0, self.config.train_steps, (x.shape[0],), device=x.device)
            alpha_bar = cosine_alpha_bar(t, self.config.train_steps)[:, None]
            x_t = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise
            return F.mse_loss(self._denoise(x_t, t, cond), noise)
        t = torch.rand(x.shape[0], device=x.device)
        x_t = (1 - t[:, None]) * x + t[:, None] * noise
        return F.mse_loss(self._denoise(x_t, t * self.config.train_steps, cond), noise - x)

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The net's prediction [M, D] in fp32. The process runs in fp32 whatever the LM's dtype: in bf16 or fp16
        ᾱ rounds to 1 near t = 0, leaving nothing to learn there and 0/0 in DDIM's last step."""
        return self.net(x_t.to(cond.dtype), t, cond).float()

    @torch.no_grad()
    def sample(
        self,
        hidden: torch.Tensor,
        temperature: float | None = None,
        cfg: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        steps: int | None = None,
    ) -> torch.Tensor:
        steps = self.config.steps if steps is None else steps
        temperature = sampling_temperature(temperature, self.config.temperature)
        if isinstance(steps, bool) or not isinstance(steps, int):  # 2.5 passed the range checks, then indexed
            raise ValueError(f"steps must be a whole number, got {steps!r}")
        if self.config.sampler == "ddim" and not 0 < steps <= self.config.train_steps:
            raise ValueError(f"steps must be in [1, {self.config.train_steps}], got {steps}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        cond, uncond = split_guidance(hidden, cfg)  # hidden is the condition of both halves of each forward
        shape = (cond.shape[0], self.config.feature_dim)

        def noise() -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=hidden.device)  # fp32, as the whole process

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            """The guided prediction [M, D] at x [M, D] and integer or scaled time t (a 0-d tensor)."""
            x2 = x if uncond is None else torch.cat([x, x])
            out = self._denoise(x2, t.expand(x2.shape[0]), hidden)
            return guide(*out.chunk(2), cfg) if uncond is not None else out

        if self.config.sampler == "flow":
            x = temperature * noise()
            times = torch.linspace(1.0, 0.0, steps + 1, device=hidden.device)
            for t, t_next in zip(times[:-1], times[1:]):
                x = x + (t_next - t) * predict(x, t * self.config.train_steps)
            return both_streams(x.to(hidden.dtype), cfg)
        times = torch.arange(steps - 1, -1, -1, device=hidden.device) * (self.config.train_steps // steps)
        times_and_end = torch.cat([times, times.new_tensor([-1])])  # the last step goes to ᾱ = 1
        alpha_bars = cosine_alpha_bar(times_and_end, self.config.train_steps)
        x = noise()
        for i, t in enumerate(times):
            a, a_prev = alpha_bars[i], alpha_bars[i + 1]
            eps = predict(x, t)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            sigma = self.config.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
            if self.config.eta > 0:
                x = x + temperature * sigma * noise()
        return both_streams(x.to(hidden.dtype), cfg)
