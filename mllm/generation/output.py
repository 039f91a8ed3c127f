"""What generation returns: per prompt, the generated ids and their text and media segments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch


@dataclass
class MediaSpan:
    """One generated media item, ready for the modality's DeTokenizer.decode."""

    modality: str
    tokens: torch.Tensor  # discrete: codes [N] in [0, codebook_size); continuous: features [N, D]


@dataclass
class Generation:
    ids: list[int]  # every generated id: text, media markers, code ids, placeholders; not the eos
    segments: list[list[int] | MediaSpan]  # text-token runs and completed media items, in order
    finish_reason: Literal["eos", "stop", "length"]

    @property
    def media(self) -> list[MediaSpan]:
        return [s for s in self.segments if isinstance(s, MediaSpan)]

    def items(self, decode_text: Callable[[list[int]], str]) -> list[str | MediaSpan]:
        """The interleaved output: each text run decoded to a string (empty ones dropped), media as they are."""
        out = []
        for segment in self.segments:
            if isinstance(segment, MediaSpan):
                out.append(segment)
            elif text := decode_text(segment):
                out.append(text)
        return out
