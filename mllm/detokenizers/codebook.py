"""The shared half of every direct decoder of discrete codes (`vq_image`, `vq_video`).

    codes [B, N] -> codebook lookup [B, N, D] -> decoder network -> media tensors [B, ...] -> media

`codebook` [K, D] is a copy of the tokenizer's, set with `set_codebook` after
joint training; in training the network reads the tokenizer's quantised
vectors directly (`decode_vectors`). `guidance` and `steps` do not apply.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from mllm.detokenizers.base import DeTokenizer


def check_code_config(num_tokens: int, codebook_size: int, code_dim: int) -> None:
    """A decoder config's codes: at least one token, two codes and one dimension."""
    if num_tokens < 1 or codebook_size < 2 or code_dim < 1:
        raise ValueError(f"need num_tokens >= 1, codebook_size >= 2 and code_dim >= 1, got {num_tokens}, "
                         f"{codebook_size}, {code_dim}")


class CodebookDecoder(DeTokenizer):
    """Subclasses build `self.decoder` (vectors [B, N, D] -> tensors [B, ...]) and turn one tensor into a medium.

    Their config has `num_tokens`, `codebook_size` and `code_dim`.
    """

    kind = "discrete"
    decoder: nn.Module

    def __init__(self, config: Any):
        super().__init__(config)
        self.register_buffer("codebook", torch.zeros(config.codebook_size, config.code_dim))

    @abc.abstractmethod
    def to_media(self, decoded: torch.Tensor) -> Any:
        """One decoded tensor (a row of `decode_vectors`' output) -> its medium."""

    @torch.no_grad()
    def set_codebook(self, codebook: torch.Tensor) -> None:
        """Copy the tokenizer's code vectors [K, D] in."""
        if codebook.shape != self.codebook.shape:
            raise ValueError(f"expected a codebook {list(self.codebook.shape)}, got {list(codebook.shape)}")
        self.codebook.copy_(codebook)

    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """vectors [B, N, D] -> the network's output, nominally in [0, 1] (unclamped: the training target)."""
        return self.decoder(vectors)

    def check_codes(self, codes: torch.Tensor) -> None:
        """Refuse anything but integer codes [B, N] in [0, codebook_size), naming the shape or value at fault."""
        c = self.config
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype.is_complex:
            kind = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"{self.name}: expected integer codes, got {kind}")
        if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] != c.num_tokens:
            raise ValueError(f"{self.name}: expected codes [B >= 1, {c.num_tokens}], got {list(codes.shape)}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= c.codebook_size:
            raise ValueError(f"{self.name}: codes must lie in [0, {c.codebook_size}), got values in [{low}, {high}]")

    @torch.no_grad()
    def decode_batch(self, codes: torch.Tensor) -> list[Any]:
        """codes [B, N] -> B media."""
        self.check_codes(codes)
        return [self.to_media(d) for d in self.decode_vectors(self.codebook[codes.long()])]

    def decode(
        self,
        tokens: torch.Tensor,
        *,
        guidance: float | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Any:
        n = self.config.num_tokens
        if not isinstance(tokens, torch.Tensor) or tokens.shape != (n,):
            got = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"{self.name}: expected codes [{n}], got {got}")
        return self.decode_batch(tokens[None])[0]
