"""Input projectors: continuous media features [n, D] -> LM embeddings [n, H]."""

from __future__ import annotations

from torch import nn

from mllm.registry import Registry

PROJECTORS: Registry[nn.Module] = Registry("projector")


def list_projectors() -> list[str]:
    return PROJECTORS.names()


@PROJECTORS.register("linear")
def linear(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim)


@PROJECTORS.register("mlp2x_gelu")
def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA-1.5's projector: Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
