"""What one run of the suite is given: its size, where its data and model come from, its scratch space."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Settings:
    quick: bool = False  # smaller models, fewer repeats: the whole suite within 15 minutes on 2 cores
    repeats: int = 5  # timed rounds of every alternation (median and min are over these)
    data: Path | None = None  # built corpora (`mllm data build`); None: data/build_small.yaml is built in `work`
    model: Path | None = None  # a Pipeline checkpoint for the memory section; None: the stand-in (see standin.py)
    work: Path = Path("bench-work")  # scratch: corpora, token caches, checkpoints

    def pick(self, quick, full):
        """`quick` under --quick, else `full`."""
        return quick if self.quick else full
