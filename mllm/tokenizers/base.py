"""The MediaTokenizer contract: a frozen map from one medium to tokens.

    encode(media) -> LongTensor [N] in [0, codebook_size)     kind == "discrete"
                   | FloatTensor [N, feature_dim]             kind == "continuous"

`num_tokens(media)` is known before encoding, so sequences can be laid out
(and length-checked) without running the encoder. A tokenizer is saved as a
directory: `media_tokenizer.yaml` (registry name + config) and, when it has
weights, `model.safetensors`.
"""

from __future__ import annotations

import abc
import os
from typing import Any, ClassVar

import torch

from mllm.module import ConfiguredModule, build_module
from mllm.registry import Registry
from mllm.vocab import ModalitySpec


MEDIA_TOKENIZERS: Registry[type[MediaTokenizer]] = Registry("media tokenizer")


class MediaTokenizer(ConfiguredModule):
    """Base class of every media tokenizer. Subclasses set the class attributes and `config_class`."""

    modality: ClassVar[str]  # "image" | "video" | "audio"
    kind: ClassVar[str]  # "discrete" | "continuous"
    config_file = "media_tokenizer.yaml"
    registry = MEDIA_TOKENIZERS

    @property
    def spec(self) -> ModalitySpec:
        """What the LM's vocabulary needs to know about this tokenizer's output."""
        if self.kind == "discrete":
            return ModalitySpec(self.modality, "discrete", codebook_size=self.codebook_size)
        return ModalitySpec(self.modality, "continuous", feature_dim=self.feature_dim)

    @property
    def codebook_size(self) -> int:
        raise AttributeError(f"{self.name} is {self.kind}: it has no codebook")

    @property
    def feature_dim(self) -> int:
        raise AttributeError(f"{self.name} is {self.kind}: it has no feature dimension")

    @property
    def load_options(self) -> dict[str, Any]:
        """Keyword arguments for `mllm.media.load_media` that load only what `encode` reads (e.g. a video's
        sampled frames): its tokens come out the same as of the whole medium."""
        return {}

    @abc.abstractmethod
    def num_tokens(self, media: Any) -> int:
        """How many tokens `encode(media)` will return."""

    @abc.abstractmethod
    def encode(self, media: Any) -> torch.Tensor:
        """LongTensor [N] of codes, or FloatTensor [N, feature_dim]."""

    def encode_many(self, media: list[Any]) -> list[torch.Tensor]:
        """`encode` of each medium: in one batch when the tokenizer has `encode_batch` (it resizes its inputs to
        one shape), else one at a time. A batch can change a tokenizer's last bits (convolutions pick other
        kernels for other batch sizes)."""
        batch = getattr(self, "encode_batch", None)
        return list(batch(media).unbind(0)) if batch is not None else [self.encode(m) for m in media]


def list_media_tokenizers() -> list[str]:
    return MEDIA_TOKENIZERS.names()


def register(cls: type[MediaTokenizer]) -> type[MediaTokenizer]:
    """Class decorator: make `cls` buildable by its `name`."""
    MEDIA_TOKENIZERS.register(cls.name)(cls)
    return cls


def build_media_tokenizer(name: str, options: dict | None = None) -> MediaTokenizer:
    return build_module(MEDIA_TOKENIZERS, name, options)


def load_media_tokenizer(path: str | os.PathLike) -> MediaTokenizer:
    return MediaTokenizer.from_pretrained(path)
