"""Typed configs: dataclasses that round-trip through YAML, with dotted overrides.

Every recipe in the repository is a YAML file that maps onto a tree of
dataclasses. Loading is strict: an unknown key or a value of the wrong type
raises `ConfigError` naming the dotted key and the file, before any work
starts.

    cfg = load_config(FinetuneConfig, "finetune/recipes/x.yaml", ["model.lora.r=16"])
    save_config(cfg, "out/config.yaml")
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from mllm.errors import InputError
from mllm.files import atomic_write_text

T = TypeVar("T")


class ConfigError(InputError, ValueError):
    """A config value that does not fit its dataclass. The message names the key and the file."""

    def __init__(self, key: str, reason: str, source: str | None = None):
        self.key, self.reason, self.source = key, reason, source
        where = f"{key} in {source}" if key and source else key or source or "<config>"
        super().__init__(f"{where}: {reason}")


def from_dict(cls: type[T], data: Any, *, source: str | None = None, _key: str = "") -> T:
    """Build dataclass `cls` from plain data, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(_key, f"expected a mapping for {cls.__name__}, got {type(data).__name__}", source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be numbers
    if unknown:
        raise ConfigError(_join(_key, unknown[0]), f"unknown key (known: {', '.join(sorted(fields))})", source)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, source, _join(_key, name))
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(_join(_key, missing[0]), "required key is missing", source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(_key, str(e), source) from e


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a dataclass tree; tuples become lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def load_config(cls: type[T], path: str | os.PathLike, overrides: list[str] | None = None) -> T:
    """Read YAML `path` into `cls`, then apply dotted `key=value` overrides."""
    data = read_yaml(path)
    if isinstance(data, dict):  # from_dict refuses anything else, naming the file
        for item in overrides or []:
            apply_override(data, item)
    return from_dict(cls, data, source=str(path))


def read_yaml(path: str | os.PathLike, what: str = "config") -> Any:
    """The data of YAML file `path` ({} when empty); a `ConfigError` names the file, and the line and column
    where the parser gave up."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError("", f"cannot read {what}: {e.strerror}", str(path)) from e
    except UnicodeDecodeError as e:
        raise ConfigError("", f"cannot read {what}: not UTF-8 text (byte {e.start})", str(path)) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # 0-based
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = "; ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None)))) or str(e)
        raise ConfigError("", f"invalid YAML: {problem}", where) from e


def apply_override(data: dict, item: str) -> None:
    """Set `a.b.c=value` in nested `data`; the value is parsed as YAML (`16`, `true`, `[1, 2]`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(item, "an override must look like key.path=value", "command line")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(key, f"'{part}' is not a section", "command line")
        node = child
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(key, f"cannot parse value {raw!r}: {e}", "command line") from e


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write `cfg` as YAML atomically (temporary file, flushed to disk, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(tp: Any, value: Any, source: str | None, key: str) -> Any:
    """Check `value` against type hint `tp`; build nested dataclasses; ints are accepted as floats."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, source, key)
            except ConfigError as e:
                errors.append(e.reason)
        raise ConfigError(key, " or ".join(errors), source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}", source)
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, _key=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__}", source)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(key, f"expected {len(args)} items, got {len(value)}", source)
            return tuple(_coerce(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__}", source)
        vt = args[1] if args else Any
        return {k: _coerce(vt, v, source, _join(key, str(k))) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}", source)
        return value
    raise ConfigError(key, f"unsupported type {tp!r} in config schema", source)
