"""ConfiguredModule: an nn.Module built from a registry name and a typed config.

Media tokenizers, de-tokenizers and heads are all saved the same way, as a
directory with `<kind>.yaml` (registry name + config) and, when the module has
weights, `model.safetensors`. Nothing is pickled.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mllm.config import ConfigError, from_dict, read_yaml, to_dict
from mllm.errors import InputError
from mllm.registry import Registry, UnknownNameError

WEIGHTS_FILE = "model.safetensors"
M = TypeVar("M", bound="ConfiguredModule")


class WeightsError(InputError, ValueError):
    """A weights file that does not load into its module; the message names the file."""


class ConfiguredModule(nn.Module, metaclass=abc.ABCMeta):
    name: ClassVar[str]  # registry name
    config_class: ClassVar[type]  # the dataclass of `config`
    config_file: ClassVar[str]  # e.g. "media_tokenizer.yaml"
    registry: ClassVar[Registry | None] = None  # a family's registry, set by its base class
    weights_elsewhere: ClassVar[bool] = False  # True: its weights load from their own source, not model.safetensors

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    @classmethod
    def from_options(cls: type[M], options: dict | None, source: str) -> M:
        """A fresh module of this class, its config checked from `options` (`source` names them in errors)."""
        return cls(from_dict(cls.config_class, options or {}, source=source)).eval()

    @classmethod
    def from_pretrained(cls: type[M], path: str | os.PathLike) -> M:
        """Load a directory written by `save_pretrained`; weights must match exactly. A family's base class
        (`MediaTokenizer`) builds whichever variant the directory names; a variant's class refuses another's."""
        path = Path(path)
        kind = cls.__name__ if cls.registry is None else cls.registry.kind
        source = path / cls.config_file
        if not source.is_file():
            raise FileNotFoundError(f"{path}: not a {kind} directory (no {cls.config_file})")
        meta = read_yaml(source, kind)
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            raise ConfigError("name", f"expected the {kind}'s registry name, got {meta!r}", str(source))
        try:
            variant = cls if cls.registry is None else cls.registry.get(meta["name"])
        except UnknownNameError as e:
            raise UnknownNameError(f"{source}: {e}") from None
        if not issubclass(variant, cls) or variant.name != meta["name"]:
            raise TypeError(f"{path}: holds a '{meta['name']}', not a {cls.__name__}")
        module = variant.from_options(meta.get("config"), source=str(source))
        if not (path / WEIGHTS_FILE).exists():
            if module.state_dict() and not variant.weights_elsewhere:  # it would run untrained, silently
                raise WeightsError(f"{path}: no {WEIGHTS_FILE} for the '{meta['name']}' {kind}'s weights")
        else:
            try:
                module.load_state_dict(load_file(path / WEIGHTS_FILE), strict=True)
            except (SafetensorError, RuntimeError) as e:  # truncated, or written for another config
                raise WeightsError(f"{path / WEIGHTS_FILE}: {' '.join(str(e).split())}") from e  # on one line
        return module.eval()

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / self.config_file).write_text(yaml.safe_dump({"name": self.name, "config": to_dict(self.config)}))
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        if state:
            save_file(state, path / WEIGHTS_FILE)
        return path


def build_module(registry: Registry[type[M]], name: str, options: dict | None = None) -> M:
    return registry.get(name).from_options(options, source=f"{registry.kind} '{name}'")

