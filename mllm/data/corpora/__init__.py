"""Built-in offline corpora: one module per corpus, built by `build.build_corpora`.

Each corpus writes `OUT/<corpus>/<split>.jsonl` (splits: train, validation,
test) plus its media under `OUT/<corpus>/media/<split>/`. A record is

    {"id": "digits-train-000042", "corpus": "digits", "task": "image_qa",
     "messages": [{"role": "user", "content": [{"type": "image", "path": "media/train/000042.png"},
                                               {"type": "text", "text": "What digit is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "7"}]}],
     "meta": {"label": 7}}

with media paths relative to the JSONL file's directory. The text corpus
writes `{"id", "corpus": "text", "text", "meta"}` lines instead.

This module holds the registry (`list_corpora()`, `get_corpus()`) and the
small helpers every corpus module shares: the build context, the record
writer, deterministic split assignment and message builders.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from mllm.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from mllm.data.corpora.build import BuildConfig
    from mllm.data.sources import SourceInfo

SPLITS: tuple[str, ...] = ("train", "validation", "test")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS = ("left", "right", "up", "down")

# Build order: a later corpus may read an earlier one's output (text reads them all).
_MODULES = ("digits", "stamps", "speech", "sounds", "video", "interleaved", "text")
CORPORA: Registry[Callable[["BuildContext"], "CorpusResult"]] = Registry("corpus")
_ORDER: list[tuple[str, str]] = []  # (corpus, the module that registered it), in registration order


def register_corpus(name: str):
    """Register a corpus builder `fn(ctx: BuildContext) -> CorpusResult` under `name`."""

    def decorator(fn):
        CORPORA.register(name)(fn)
        _ORDER.append((name, fn.__module__.rpartition(".")[2]))
        return fn

    return decorator


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def list_corpora() -> list[str]:
    """Names of all registered corpora, in build order: by their module's place in `_MODULES`, whichever module
    was imported first (others after), then in the order they registered."""
    _load_all()
    rank = {module: i for i, module in enumerate(_MODULES)}
    return [name for name, module in sorted(_ORDER, key=lambda entry: rank.get(entry[1], len(rank)))]


def get_corpus(name: str) -> Callable[["BuildContext"], "CorpusResult"]:
    _load_all()
    return CORPORA.get(name)


# ---------------------------------------------------------------- results and context


@dataclass
class CorpusResult:
    """What one corpus reports to the manifest."""

    name: str
    sources: list["SourceInfo"]
    counts: dict[str, int]
    tasks: dict[str, dict[str, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    eval_only: bool = False


@dataclass
class BuildContext:
    cfg: "BuildConfig"
    root: Path  # the (temporary) output root
    limit: int | None = None  # cap on source items per corpus and split
    progress: bool = True

    def rng(self, *names: str) -> np.random.Generator:
        """A generator seeded by the build seed and `names` (independent of build order)."""
        keys = [zlib.crc32(n.encode()) for n in names]
        return np.random.default_rng([int(self.cfg.seed), *keys])

    def cap(self, n: int) -> int:
        return n if self.limit is None else min(n, self.limit)

    def bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{desc:<12}", unit="item", disable=not self.progress, leave=True)

    def output(self, corpus: str, splits: Sequence[str] = SPLITS) -> "CorpusOutput":
        return CorpusOutput(self.root, corpus, splits)


class CorpusOutput:
    """Writes one corpus: a JSONL file per split and the media beside it."""

    def __init__(self, root: Path, corpus: str, splits: Sequence[str] = SPLITS):
        self.corpus = corpus
        self.dir = root / corpus
        self.dir.mkdir(parents=True, exist_ok=True)
        self.splits = tuple(splits)
        self._files = {s: open(self.dir / f"{s}.jsonl", "w", encoding="utf-8") for s in self.splits}
        self.counts = {s: 0 for s in self.splits}
        self.tasks: dict[str, dict[str, int]] = {}

    def media(self, split: str, name: str) -> tuple[Path, str]:
        """(absolute path to write, path relative to the JSONL directory) for a media file."""
        rel = f"media/{split}/{name}"
        path = self.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, rel

    def add(self, split: str, task: str, messages: list[dict], meta: dict | None = None) -> dict:
        n = self.counts[split]
        rec = {
            "id": f"{self.corpus}-{split}-{n:06d}",
            "corpus": self.corpus,
            "task": task,
            "messages": messages,
            "meta": meta or {},
        }
        self._write(split, rec)
        self.tasks.setdefault(task, {s: 0 for s in self.splits})[split] += 1
        return rec

    def add_text(self, split: str, text: str, meta: dict | None = None) -> dict:
        n = self.counts[split]
        rec = {"id": f"{self.corpus}-{split}-{n:06d}", "corpus": self.corpus, "text": text}
        if meta:
            rec["meta"] = meta
        self._write(split, rec)
        return rec

    def _write(self, split: str, rec: dict) -> None:
        self._files[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.counts[split] += 1

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> "CorpusOutput":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- messages


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def media_part(kind: str, rel: str) -> dict:
    return {"type": kind, "path": rel}


def user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def assistant(*parts: dict) -> dict:
    return {"role": "assistant", "content": list(parts)}


def a_digit(d: int | str) -> str:
    """'a 3', 'an 8' (read aloud: "an eight")."""
    return f"an {d}" if str(d) == "8" else f"a {d}"


def choice_letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def multiple_choice_prompt(question: str, choices: Sequence[str]) -> str:
    lines = [question] + [f"{l}. {c}" for l, c in zip(choice_letters(len(choices)), choices)]
    lines.append("Answer with the letter.")
    return "\n".join(lines)


# ---------------------------------------------------------------- splits


def stable_hash(key: str) -> int:
    """A 64-bit hash of `key` that is the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def fractions_of(fr) -> list[float]:
    return [float(getattr(fr, s)) for s in SPLITS]


def split_by_hash(key: str, fractions, salt: str = "") -> str:
    """The split of one item from the hash of its key (stable, roughly proportional)."""
    u = stable_hash(f"{salt}:{key}") / 2.0**64
    acc = 0.0
    fr = fractions_of(fractions)
    for s, f in zip(SPLITS, fr):
        acc += f
        if u < acc:
            return s
    return SPLITS[-1]


def split_exact(keys: Iterable[str], fractions, salt: str = "") -> dict[str, str]:
    """Assign groups to splits with exact proportions: order by stable hash, then cut.

    Every split with a non-zero fraction gets at least one key when there are enough keys.
    """
    keys = sorted(set(keys), key=lambda k: (stable_hash(f"{salt}:{k}"), k))
    n = len(keys)
    fr = fractions_of(fractions)
    sizes = [int(round(f * n)) for f in fr]
    for i in (2, 1):  # make sure small held-out splits are not empty
        if fr[i] > 0 and sizes[i] == 0 and n >= 3:
            sizes[i] = 1
    sizes[0] = n - sizes[1] - sizes[2]
    out, start = {}, 0
    for s, size in zip(SPLITS, sizes):
        for k in keys[start:start + size]:
            out[k] = s
        start += size
    return out


def normalise_caption(caption: str) -> str:
    """A key under which near-identical captions group (case, punctuation and articles dropped)."""
    words = "".join(c.lower() if c.isalnum() else " " for c in caption).split()
    while words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def first_test_record(corpora: Path, corpus: str, task: str, keep: Callable[[dict], bool] = lambda r: True) -> dict:
    """The first record of `task` in the built `corpora`'s `corpus` test split that `keep` accepts."""
    with open(corpora / corpus / "test.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("task") == task and keep(record):
                return record
    raise LookupError(f"{corpora / corpus / 'test.jsonl'}: no {task} record to show")
