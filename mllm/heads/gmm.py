"""GMM head (Divot, GIVT): a mixture of k diagonal Gaussians over the D-dim feature, per hidden state.

    hidden [M, H] ──MLP──▶ k logits, k·D means, k·D variances (softplus, clamped ≥ min_variance)
    loss   = −log p(target) / D             (Divot: the NLL per dimension)
             + mean_weight · |Σ π μ − target|² / D   (optional: trains the mean that `mode: mean` reads out)
    sample = a component ~ π, then μ + σ' · ε,   σ' = σ · √variance_scale · temperature

Temperature and `variance_scale` both shrink σ (GIVT scales σ by the
temperature, Divot the variance by 0.1). Besides drawing a sample, `mode`
can take the mixture's weighted mean, or its mode: the component mean where
the mixture density is highest. A head read out by its mean should train
with `mean_weight` > 0: the NLL alone is met by components spread over the
modes of every target, whatever the context, and their mean is then the same
average for every prompt (`mixture_mean_mse`).

Guidance is density-based, as in GIVT. The target is p_c^cfg · p_u^(1−cfg).
A sample draws `cfg_candidates` candidates from p_c and keeps one with
probability ∝ (p_c / p_u)^(cfg − 1) (importance resampling); the mode is the
component mean with the highest guided density; the mean is extrapolated,
u + cfg · (c − u), like a regression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from mllm.heads.base import Head, both_streams, guide, mlp, register, sampling_temperature, split_guidance
from mllm.losses import gaussian_mixture, gmm_nll, mixture_mean, mixture_mean_mse

Mode = Literal["sample", "mean", "mode"]
Mixture = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # logits [M, k], means [M, k, D], stds [M, k, D]


@dataclass
class GMMHeadConfig:
    hidden_size: int  # H, the LM's hidden size
    feature_dim: int  # D
    num_components: int = 16  # k
    width: int = 1024
    depth: int = 2  # hidden layers of the MLP
    min_variance: float = 1e-5  # Divot's clamp on softplus(variance)
    variance_scale: float = 1.0  # multiplies the variance when sampling (Divot: 0.1)
    mode: Mode = "sample"  # sample()'s default readout
    temperature: float = 1.0  # sample()'s default temperature
    cfg_candidates: int = 64  # draws per row for density-based guidance
    mean_weight: float = 0.0  # weight of the mixture mean's squared error in the loss; > 0 for `mode: mean`

    def __post_init__(self):
        if min(self.hidden_size, self.feature_dim, self.num_components, self.width, self.cfg_candidates) <= 0:
            raise ValueError("hidden_size, feature_dim, num_components, width and cfg_candidates must be positive")
        if not (self.depth >= 0 and 0 < self.min_variance < math.inf and 0 < self.variance_scale < math.inf
                and 0 <= self.temperature < math.inf):  # written so that NaN fails too
            raise ValueError(
                f"depth and temperature must be >= 0, min_variance and variance_scale positive, all finite, got "
                f"{self.depth}, {self.temperature}, {self.min_variance} and {self.variance_scale}"
            )
        if not self.mean_weight >= 0:
            raise ValueError(f"mean_weight must be >= 0, got {self.mean_weight}")


@register
class GMMHead(Head):
    name = "gmm"
    config_class = GMMHeadConfig

    def __init__(self, config: GMMHeadConfig):
        super().__init__(config)
        k, d = config.num_components, config.feature_dim
        self.net = mlp(config.hidden_size, config.width, k + 2 * k * d, config.depth)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier hidden layers; a small output layer, so training starts from a broad mixture around 0
        whose components differ (a zero output layer would keep them identical for good)."""
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.net[-1].weight, std=0.02)

    def mixture(self, hidden: torch.Tensor) -> Mixture:
        """hidden [M, H] -> the mixture's parameters, in fp32."""
        k, d = self.config.num_components, self.config.feature_dim
        logits, means, raw = self.net(hidden).float().split([k, k * d, k * d], dim=-1)
        variance = F.softplus(raw).clamp_min(self.config.min_variance)
        return logits, means.unflatten(-1, (k, d)), variance.sqrt().unflatten(-1, (k, d))

    def nll(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """−log p(target) [M] in nats, over all D dimensions."""
        return gmm_nll(*self.mixture(hidden), target)

    def loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mixture = self.mixture(hidden)
        loss = gmm_nll(*mixture, target).mean() / self.config.feature_dim
        if self.config.mean_weight:
            loss = loss + self.config.mean_weight * mixture_mean_mse(*mixture[:2], target)
        return loss

    @torch.no_grad()
    def sample(
        self,
        hidden: torch.Tensor,
        temperature: float | None = None,
        cfg: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        mode: Mode | None = None,
    ) -> torch.Tensor:
        mode = self.config.mode if mode is None else mode
        if mode not in get_args(Mode):
            raise ValueError(f"mode must be one of {list(get_args(Mode))}, got {mode!r}")
        temperature = sampling_temperature(temperature, self.config.temperature)
        cond, uncond = split_guidance(hidden, cfg)
        scale = self.config.variance_scale**0.5 * temperature
        c = self._tempered(cond, scale)
        u = None if uncond is None else self._tempered(uncond, scale)
        rows = torch.arange(cond.shape[0], device=hidden.device)
        if mode == "mean":
            out = guide(mixture_mean(*c[:2]), None if u is None else mixture_mean(*u[:2]), cfg)
        elif mode == "mode":
            candidates = c[1].transpose(0, 1)  # [k, M, D]: every component mean
            out = candidates[_guided_log_prob(candidates, c, u, cfg).argmax(0), rows]
        elif u is None:
            out = _draw(c, 1, generator)[0]
        else:
            candidates = _draw(c, self.config.cfg_candidates, generator)  # [C, M, D] from p_c
            log_ratio = gaussian_mixture(*c).log_prob(candidates) - gaussian_mixture(*u).log_prob(candidates)  # [C, M]
            log_weight = (cfg - 1) * log_ratio
            pick = torch.multinomial(log_weight.T.softmax(-1), 1, generator=generator).squeeze(-1)  # [M]
            out = candidates[pick, rows]
        return both_streams(out.to(hidden.dtype), cfg)

    def _tempered(self, hidden: torch.Tensor, scale: float) -> Mixture:
        logits, means, stds = self.mixture(hidden)
        # σ keeps its floor at any temperature, so densities stay finite.
        return logits, means, (stds * scale).clamp_min(self.config.min_variance**0.5)


def _guided_log_prob(x: torch.Tensor, cond: Mixture, uncond: Mixture | None, cfg: float) -> torch.Tensor:
    """log of p_c(x)^cfg · p_u(x)^(1 − cfg), up to a constant: x [C, M, D] -> [C, M]."""
    log_cond = gaussian_mixture(*cond).log_prob(x)
    if uncond is None:
        return log_cond
    return cfg * log_cond + (1 - cfg) * gaussian_mixture(*uncond).log_prob(x)


def _draw(mixture: Mixture, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """n draws per row, [n, M, D]: a component by its weight, then a Gaussian draw around it."""
    logits, means, stds = mixture
    m, _, d = means.shape
    component = torch.multinomial(logits.softmax(-1), n, replacement=True, generator=generator).T  # [n, M]
    rows = torch.arange(m, device=means.device)
    noise = torch.randn(n, m, d, generator=generator, device=means.device, dtype=means.dtype)
    return means[rows, component] + stds[rows, component] * noise
