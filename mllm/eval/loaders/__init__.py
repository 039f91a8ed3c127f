"""Readers of benchmarks in their native formats, one module per format.

Each module has an `Options` dataclass (a task spec's `options:`) and
`load(name, path, options, bad) -> Task`. A bad item (a line that is not JSON,
a missing field, a missing media file) becomes a `BadRecordError` naming
`file:line`, which `bad` (mllm.data.records.BadRecords) skips or raises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm.data.records import BadRecords
from mllm.eval.loaders import captioning, jsonl, librispeech, mmbench, mme, pope, seed, videoqa, vqav2
from mllm.eval.tasks import Task


@dataclass(frozen=True)
class Loader:
    options: type  # the dataclass of its options
    load: Callable[[str, Path, Any, BadRecords], Task]


LOADERS: dict[str, Loader] = {
    module.__name__.rsplit(".", 1)[-1]: Loader(module.Options, module.load)
    for module in (mme, mmbench, seed, pope, vqav2, videoqa, librispeech, captioning, jsonl)
}
