"""The Head contract: continuous features from the LM's hidden states (MAR's `DiffLoss` protocol).

    loss(hidden [M, H], target [M, D]) -> scalar
    sample(hidden [M, H], temperature, cfg) -> [M, D]

`temperature` None means the head's own default (its config's `temperature`,
the readout its recipe chose; a GMM head's `mode` is kept the same way).

With `cfg != 1`, `hidden` is `cat(conditional, unconditional)` along M and
both halves of the result are the same guided sample, so the caller can feed
it back into both streams. `cfg == 1` means no guidance and a plain
conditional batch. Heads take their device and dtype from `hidden`. A head is
saved as a directory: `head.yaml` (registry name + config) and
`model.safetensors`; inside a MultimodalLM it is part of the model's weights.
"""

from __future__ import annotations

import abc
import math
import os

import torch
from torch import nn

from mllm.module import ConfiguredModule, build_module
from mllm.registry import Registry


HEADS: Registry[type[Head]] = Registry("head")


class Head(ConfiguredModule):
    """Base class of every continuous output head. Subclasses set `name` and `config_class`, whose dataclass
    has `hidden_size` (H) and `feature_dim` (D)."""

    config_file = "head.yaml"
    registry = HEADS

    @abc.abstractmethod
    def loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of predicting `target` [M, D] from `hidden` [M, H]."""

    @abc.abstractmethod
    def sample(
        self,
        hidden: torch.Tensor,
        temperature: float | None = None,
        cfg: float = 1.0,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Features [M, D] for `hidden` [M, H]; see the module docstring for `cfg`."""

    @abc.abstractmethod
    def reset_parameters(self) -> None:
        """(Re-)initialise every weight; MultimodalLM calls it after HF's generic initialiser."""


def list_heads() -> list[str]:
    return HEADS.names()


def register(cls: type[Head]) -> type[Head]:
    """Class decorator: make `cls` buildable by its `name`."""
    HEADS.register(cls.name)(cls)
    return cls


def build_head(name: str, options: dict | None = None) -> Head:
    return build_module(HEADS, name, options)


def load_head(path: str | os.PathLike) -> Head:
    return Head.from_pretrained(path)


def mlp(in_dim: int, width: int, out_dim: int, depth: int) -> nn.Sequential:
    """`depth` hidden layers of `width` with GELU, then a linear map to `out_dim`."""
    layers, dim = [], in_dim
    for _ in range(depth):
        layers += [nn.Linear(dim, width), nn.GELU()]
        dim = width
    return nn.Sequential(*layers, nn.Linear(dim, out_dim))


def sampling_temperature(temperature: float | None, default: float) -> float:
    """The call's temperature, or the head's default for None: a finite number >= 0 (NaN passed a `< 0` check,
    and a GMM head read a negative one as 0)."""
    value = default if temperature is None else temperature
    if not 0 <= value < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {value}")
    return value


def split_guidance(hidden: torch.Tensor, cfg: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`hidden` -> (conditional, unconditional or None): halves of the batch when `cfg != 1`."""
    if cfg == 1.0:
        return hidden, None
    if hidden.shape[0] % 2:
        raise ValueError(f"with cfg={cfg} hidden must be cat(cond, uncond), got an odd batch of {hidden.shape[0]}")
    cond, uncond = hidden.chunk(2)
    return cond, uncond


def guide(cond: torch.Tensor, uncond: torch.Tensor | None, cfg: float) -> torch.Tensor:
    """Classifier-free guidance of a prediction: uncond + cfg · (cond − uncond); `cond` itself without one."""
    return cond if uncond is None else uncond + cfg * (cond - uncond)


def both_streams(sample: torch.Tensor, cfg: float) -> torch.Tensor:
    """A guided sample [M, D] repeated for the conditional and unconditional halves of the batch."""
    return sample if cfg == 1.0 else torch.cat([sample, sample])
