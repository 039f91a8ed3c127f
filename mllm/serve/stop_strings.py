"""OpenAI's stop sequences: a reply ends before the first one and never contains it, streamed or not.

The engine ends a row once its current text run contains a stop string (GenerationConfig.stop_strings),
by then written and streamed with the tokens that made it. `cut` trims a finished run; `StopFilter`
trims a streamed one, holding back a tail that may be the start of a stop string until it is not.
"""

from __future__ import annotations

from collections.abc import Sequence


def cut(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string in it; all of it when it holds none."""
    return text[:min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))]


class StopFilter:
    """One reply's streamed text -> what may be sent. A medium ends a text run: the engine looks for stop
    strings within a run, so `flush` (at a medium or the reply's end) sends the tail held back."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.run, self.sent = "", 0  # the current text run; how much of it was sent

    def text(self, delta: str) -> str:
        self.run += delta
        end = len(cut(self.run, self.stops))
        if end == len(self.run):
            end -= self._held(self.run)
        return self._send(end)

    def flush(self) -> str:
        out = self._send(len(cut(self.run, self.stops)))
        self.run, self.sent = "", 0
        return out

    def _held(self, text: str) -> int:
        """The length of the longest tail of `text` that begins a stop string."""
        return max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def _send(self, end: int) -> str:
        out = self.run[self.sent:end]
        self.sent = max(self.sent, end)
        return out
