"""Alternating measurement: a candidate and its baseline timed in turn, in one process.

    times = alternate({"hf": hf_step, "ours": our_step}, repeats=5)
    times["ours"].median / times["hf"].median      # a ratio robust to the machine's drifting load

Every repeat runs each variant once; the order rotates by one each repeat, so
neither side always runs first (after a warm-up of each). Shared cores make
single timings noisy: figures use the median, and the minimum (the best the
machine gave) is kept beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)  # one per repeat

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    def rate(self, work: float) -> tuple[float, float]:
        """work per second at the median and at the best repeat."""
        return work / self.median, work / self.min


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def alternate(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Seconds of each variant over `repeats` rounds; round r starts at variant r mod n."""
    if repeats < 1 or not variants:
        raise ValueError("need at least one variant and one repeat")
    names = list(variants)
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = {name: Timing() for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].seconds.append(timed(variants[name]))
    return times
