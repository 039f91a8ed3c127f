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
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from mllm.config import from_dict, to_dict
from mllm.registry import Registry
from mllm.vocab import ModalitySpec

CONFIG_FILE = "media_tokenizer.yaml"
WEIGHTS_FILE = "model.safetensors"


class MediaTokenizer(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every media tokenizer. Subclasses set the class attributes and `config_class`."""

    name: ClassVar[str]  # registry name
    modality: ClassVar[str]  # "image" | "video" | "audio"
    kind: ClassVar[str]  # "discrete" | "continuous"
    config_class: ClassVar[type]

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

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

    @abc.abstractmethod
    def num_tokens(self, media: Any) -> int:
        """How many tokens `encode(media)` will return."""

    @abc.abstractmethod
    def encode(self, media: Any) -> torch.Tensor:
        """LongTensor [N] of codes, or FloatTensor [N, feature_dim]."""

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(yaml.safe_dump({"name": self.name, "config": to_dict(self.config)}))
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        if state:
            save_file(state, path / WEIGHTS_FILE)
        return path


MEDIA_TOKENIZERS: Registry[type[MediaTokenizer]] = Registry("media tokenizer")


def list_media_tokenizers() -> list[str]:
    return MEDIA_TOKENIZERS.names()


def register(cls: type[MediaTokenizer]) -> type[MediaTokenizer]:
    """Class decorator: make `cls` buildable by its `name`."""
    MEDIA_TOKENIZERS.register(cls.name)(cls)
    return cls


def build_media_tokenizer(name: str, options: dict | None = None) -> MediaTokenizer:
    cls = MEDIA_TOKENIZERS.get(name)
    return cls(from_dict(cls.config_class, options or {}, source=f"media tokenizer '{name}'")).eval()


def load_media_tokenizer(path: str | os.PathLike) -> MediaTokenizer:
    """Load a directory written by `MediaTokenizer.save_pretrained`; weights must match exactly."""
    path = Path(path)
    try:
        meta = yaml.safe_load((path / CONFIG_FILE).read_text())
    except OSError as e:
        raise FileNotFoundError(f"{path}: not a media tokenizer directory (no {CONFIG_FILE})") from e
    tokenizer = build_media_tokenizer(meta["name"], meta.get("config"))
    if (path / WEIGHTS_FILE).exists():
        tokenizer.load_state_dict(load_file(path / WEIGHTS_FILE), strict=True)
    return tokenizer.eval()

