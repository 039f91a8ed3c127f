"""The DeTokenizer contract: tokens back to a medium.

    decode(tokens, guidance=..., steps=...) -> Image | Audio | Video
        tokens: LongTensor [N] (discrete) or FloatTensor [N, D] (continuous)

A diffusion de-tokenizer is conditioned on the tokens; its unconditional
branch is the encoding of an empty medium (black frame, silence), and
`guidance` is the classifier-free guidance scale (1 = none); left out, the
de-tokenizer uses the one saved in its config, the scale its recipe chose.
A direct decoder (VQ decoder, codec) ignores `guidance` and `steps`. Saved as a directory:
`detokenizer.yaml` (registry name + config) and `model.safetensors`.
"""

from __future__ import annotations

import abc
import os
from typing import Any, ClassVar

import torch

from mllm.module import ConfiguredModule, build_module
from mllm.registry import Registry


DETOKENIZERS: Registry[type[DeTokenizer]] = Registry("de-tokenizer")


class DeTokenizer(ConfiguredModule):
    """Base class of every de-tokenizer. Subclasses set the class attributes and `config_class`."""

    modality: ClassVar[str]  # "image" | "video" | "audio"
    kind: ClassVar[str]  # kind of tokens it reads: "discrete" | "continuous"
    config_file = "detokenizer.yaml"
    registry = DETOKENIZERS

    @property
    def guidance(self) -> float:
        """The classifier-free guidance scale `decode` uses when it is given none; 1: none."""
        return 1.0

    def resolve_guidance(self, guidance: float | None) -> float:
        """`guidance`, or this de-tokenizer's saved default when it is None."""
        return self.guidance if guidance is None else guidance

    @abc.abstractmethod
    def decode(
        self,
        tokens: torch.Tensor,
        *,
        guidance: float | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Any:
        """One medium from its tokens; `generator` makes stochastic decoders reproducible."""


def list_detokenizers() -> list[str]:
    return DETOKENIZERS.names()


def register(cls: type[DeTokenizer]) -> type[DeTokenizer]:
    """Class decorator: make `cls` buildable by its `name`."""
    DETOKENIZERS.register(cls.name)(cls)
    return cls


def build_detokenizer(name: str, options: dict | None = None) -> DeTokenizer:
    return build_module(DETOKENIZERS, name, options)


def load_detokenizer(path: str | os.PathLike) -> DeTokenizer:
    return DeTokenizer.from_pretrained(path)
