"""Diffusion de-tokenizers: a denoiser conditioned on a token sequence, on diffusers schedulers.

Shared by every medium (the image de-tokenizer now, video and audio later):
a subclass supplies the denoiser network and the tensor <-> medium mapping;
this base class owns the rest:

    training   x0 [B, ...] in [-1, 1], tokens [B, N, D] -> one scheduler's loss, with condition dropout
    sampling   tokens [B, N, D] -> x0 [B, ...], `steps` scheduler steps, classifier-free guidance

Schedulers (diffusers): "ddpm" and "ddim" (a discrete noise schedule; the
network predicts epsilon, v or x0) and "flow_matching" (rectified flow:
x_t = (1 - σ) x0 + σ ε, the network predicts the velocity ε - x0, sampled
with Euler steps). DDPM and DDIM share their training, so a model trained
with either samples with either.

The unconditional branch is the tokenizer's encoding of an empty medium (a
black image, a silent clip): the `null_tokens` buffer [N, D], set once by the
recipe. Training replaces a `cond_dropout` share of the condition with it;
sampling mixes the two predictions, uncond + guidance · (cond − uncond), so
guidance 1 is plain conditional sampling.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from mllm.detokenizers.base import DeTokenizer


@dataclass
class DiffusionConfig:
    scheduler: Literal["ddpm", "ddim", "flow_matching"] = "flow_matching"
    train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"  # ddpm, ddim
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"  # ddpm, ddim
    steps: int = 25  # sampling steps when decode() is not given any
    guidance: float = 1.0  # classifier-free guidance scale when decode() is not given one; 1: none
    cond_dropout: float = 0.1  # share of training samples conditioned on the empty medium instead

    def __post_init__(self):
        if self.train_timesteps < 2 or self.steps < 1:
            raise ValueError(f"need train_timesteps >= 2 and steps >= 1, got {self.train_timesteps}, {self.steps}")
        if problem := sampling_problem(self, self.guidance, self.steps):
            raise ValueError(problem)
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")


def sampling_problem(cfg: DiffusionConfig, guidance: float, steps: int) -> str | None:
    """Why `cfg`'s schedule cannot sample with `guidance` and `steps`, or None."""
    if not 0 <= guidance < math.inf:
        return f"guidance must be a finite number >= 0, got {guidance}"
    if steps < 1 or (cfg.scheduler != "flow_matching" and steps > cfg.train_timesteps):
        bound = "" if cfg.scheduler == "flow_matching" else f" and <= train_timesteps {cfg.train_timesteps} ({cfg.scheduler})"
        return f"steps must be >= 1{bound}, got {steps}"
    return None


def make_scheduler(cfg: DiffusionConfig) -> SchedulerMixin:
    """A fresh scheduler: diffusers schedulers keep per-run state, so every sampling run gets its own."""
    if cfg.scheduler == "flow_matching":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.train_timesteps)
    cls = DDIMScheduler if cfg.scheduler == "ddim" else DDPMScheduler
    return cls(
        num_train_timesteps=cfg.train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        timestep_spacing="trailing",  # few-step sampling starts from pure noise
    )


class DiffusionDeTokenizer(DeTokenizer):
    """Base of the diffusion de-tokenizers; `config` has num_tokens, token_dim and diffusion (a DiffusionConfig)."""

    kind = "continuous"

    def __init__(self, config: Any):
        super().__init__(config)
        self.register_buffer("null_tokens", torch.zeros(config.num_tokens, config.token_dim))
        self.noise_schedule = make_scheduler(config.diffusion)  # training's noise levels (ddpm, ddim)

    def conditioning(self, tokens: torch.Tensor) -> Any:
        """What `denoise` reads of tokens [B, N, D], computed once per sample or loss, not once per step: the
        tokens themselves, unless a de-tokenizer derives something costly from them."""
        return tokens

    @abc.abstractmethod
    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, tokens: Any) -> torch.Tensor:
        """The network: noisy sample [B, ...], timesteps [B] in [0, train_timesteps), tokens as `conditioning`
        returns them -> prediction [B, ...]."""

    @property
    @abc.abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample, e.g. (3, H, W)."""

    @abc.abstractmethod
    def to_media(self, sample: torch.Tensor) -> Any:
        """One denoised sample in [-1, 1] -> the medium."""

    @torch.no_grad()
    def set_null_tokens(self, tokens: torch.Tensor) -> None:
        """The tokenizer's encoding of the empty medium, [N, D]: the unconditional branch."""
        self.check_tokens(tokens[None])
        self.null_tokens.copy_(tokens)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Refuse anything but finite float tokens [B, N, D], naming the shape or value at fault."""
        n, d = self.config.num_tokens, self.config.token_dim
        if not isinstance(tokens, torch.Tensor) or not tokens.dtype.is_floating_point:
            kind = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"{self.name}: expected float feature tokens, got {kind}")
        if tokens.ndim != 3 or tokens.shape[0] == 0 or tokens.shape[1:] != (n, d):
            raise ValueError(f"{self.name}: expected tokens [B >= 1, {n}, {d}], got {list(tokens.shape)}")
        if not torch.isfinite(tokens).all():
            raise ValueError(f"{self.name}: tokens contain NaN or inf")

    def diffusion_loss(self, x0: torch.Tensor, tokens: torch.Tensor, null_tokens: torch.Tensor | None = None,
                       conditioned: Any = None) -> torch.Tensor:
        """MSE of the denoiser's prediction at random noise levels; x0 [B, ...] in [-1, 1], tokens [B, N, D].

        `null_tokens` [N, D] is the current encoding of the empty medium (the buffer if None); it may carry
        gradients when the tokenizer trains jointly. `conditioned` is `conditioning(tokens)` where the caller
        has it already (a costly conditioning is then computed once per batch, plus once for the null row).
        """
        cfg = self.config.diffusion
        b = len(x0)
        null = self.null_tokens if null_tokens is None else null_tokens
        drop = torch.rand(b, device=x0.device) < cfg.cond_dropout
        conditioned = self.conditioning(tokens) if conditioned is None else conditioned
        tokens = drop_rows(conditioned, self.conditioning(null[None]), drop)
        noise = torch.randn_like(x0)
        if cfg.scheduler == "flow_matching":
            sigma = torch.rand(b, device=x0.device)
            s = sigma.view(b, *[1] * (x0.ndim - 1))
            prediction = self.denoise((1 - s) * x0 + s * noise, sigma * cfg.train_timesteps, tokens)
            return F.mse_loss(prediction, noise - x0)
        t = torch.randint(0, cfg.train_timesteps, (b,), device=x0.device)
        noisy = self.noise_schedule.add_noise(x0, noise, t)
        target = {
            "epsilon": noise,
            "v_prediction": self.noise_schedule.get_velocity(x0, noise, t),
            "sample": x0,
        }[cfg.prediction_type]
        return F.mse_loss(self.denoise(noisy, t, tokens), target)

    @property
    def guidance(self) -> float:
        return self.config.diffusion.guidance

    @torch.no_grad()
    def sample(
        self,
        tokens: torch.Tensor,
        *,
        guidance: float | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """tokens [B, N, D] -> samples [B, *sample_shape] in [-1, 1]."""
        self.check_tokens(tokens)
        steps = self.config.diffusion.steps if steps is None else steps
        guidance = self.resolve_guidance(guidance)
        if problem := sampling_problem(self.config.diffusion, guidance, steps):
            raise ValueError(f"{self.name}: {problem}")
        b = len(tokens)
        scheduler = make_scheduler(self.config.diffusion)
        scheduler.set_timesteps(steps)
        x = torch.randn((b, *self.sample_shape), generator=generator).to(tokens.device)
        if guidance != 1.0:  # one batch: conditional rows, then unconditional rows
            tokens = torch.cat([tokens, self.null_tokens.expand_as(tokens)])
        conditioning = self.conditioning(tokens)
        for t in scheduler.timesteps:
            timesteps = t.expand(len(tokens)).to(tokens.device)
            if guidance == 1.0:
                prediction = self.denoise(x, timesteps, conditioning)
            else:
                cond, uncond = self.denoise(torch.cat([x, x]), timesteps, conditioning).chunk(2)
                prediction = uncond + guidance * (cond - uncond)
            x = scheduler.step(prediction, t, x, generator=generator).prev_sample
        return x.clamp(-1, 1)

    def decode_batch(
        self,
        tokens: torch.Tensor,
        *,
        guidance: float | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Any]:
        """tokens [B, N, D] -> B media."""
        samples = self.sample(tokens, guidance=guidance, steps=steps, generator=generator)
        return [self.to_media(s) for s in samples]

    def decode(
        self,
        tokens: torch.Tensor,
        *,
        guidance: float | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Any:
        n, d = self.config.num_tokens, self.config.token_dim
        if not isinstance(tokens, torch.Tensor) or tokens.shape != (n, d):
            got = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"{self.name}: expected tokens [{n}, {d}], got {got}")
        return self.decode_batch(tokens[None], guidance=guidance, steps=steps, generator=generator)[0]


def drop_rows(conditioned: Any, null: Any, drop: torch.Tensor) -> Any:
    """`conditioned`'s rows with `null`'s (batch 1) where drop [B]: on a tensor, or a tuple of tensors and Nones."""
    if isinstance(conditioned, tuple):
        return tuple(drop_rows(c, n, drop) for c, n in zip(conditioned, null))
    if conditioned is None:
        return None
    return torch.where(drop.view(-1, *[1] * (conditioned.ndim - 1)), null, conditioned)
