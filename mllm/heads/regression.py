"""Regression head (SEED-X, Emu2): an MLP predicts the feature itself, trained with MSE.

The baseline the distributional heads must beat: it returns the conditional
mean, so `temperature` has nothing to scale; guidance extrapolates the
prediction, u + cfg · (c − u).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mllm.heads.base import Head, both_streams, guide, mlp, register, split_guidance


@dataclass
class RegressionHeadConfig:
    hidden_size: int  # H, the LM's hidden size
    feature_dim: int  # D
    width: int = 1024
    depth: int = 2  # hidden layers of the MLP

    def __post_init__(self):
        if min(self.hidden_size, self.feature_dim, self.width) <= 0 or self.depth < 0:
            raise ValueError("hidden_size, feature_dim and width must be positive, depth >= 0")


@register
class RegressionHead(Head):
    name = "regression"
    config_class = RegressionHeadConfig

    def __init__(self, config: RegressionHeadConfig):
        super().__init__(config)
        self.net = mlp(config.hidden_size, config.width, config.feature_dim, config.depth)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier hidden layers; a small output layer, so the first predictions are near 0 and their
        gradients do not swamp the LM's."""
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.net[-1].weight, std=0.02)

    def loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.net(hidden).float(), target.float())

    @torch.no_grad()
    def sample(
        self,
        hidden: torch.Tensor,
        temperature: float | None = None,
        cfg: float = 1.0,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        cond, uncond = split_guidance(hidden, cfg)
        prediction = guide(self.net(cond), None if uncond is None else self.net(uncond), cfg)
        return both_streams(prediction, cfg)
