"""Name -> builder registries. Each family of variants (projectors, media
tokenizers, heads, chat templates, ...) owns one and exposes `list_*()`.

    PROJECTORS = Registry("projector")

    @PROJECTORS.register("mlp2x_gelu")
    def mlp2x_gelu(in_dim, out_dim): ...

    PROJECTORS.build("mlp2x_gelu", in_dim=16, out_dim=64)
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from mllm.errors import InputError

T = TypeVar("T")


class UnknownNameError(InputError, KeyError):
    """A name no builder is registered under; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._builders[name] = builder
            return builder

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._builders[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} '{name}' (available: {', '.join(self.names()) or 'none'})") from None

    def build(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders
