"""Record files: one conversation per record, as JSONL or Parquet, read into `datasets`.

A record holds messages in the content-list form the processor takes:

    {"id": "digits-train-000042", "corpus": "digits", "task": "image_qa",
     "messages": [{"role": "user", "content": [{"type": "image", "path": "media/train/000042.png"},
                                               {"type": "text", "text": "What digit is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "7"}]}],
     "meta": {"label": 7}}

A medium is named by a path relative to the record file's directory, or
embedded as `"bytes"` (base64 text in JSONL, binary in Parquet). A record with
`"text"` and no `"messages"` (plain text, as the built-in text corpus writes)
becomes one assistant turn, so all of its text is labelled. In Parquet,
`messages` is a nested column or a JSON string.

Every line becomes a row, even one that is not JSON: the row carries the
conversation as JSON text (parts of different shapes survive Arrow's schema)
and the parse error, if any. `check_record` turns a row into a `Record` or
raises `BadRecordError` naming file:line (1-based line for JSONL, 0-based row
for Parquet); `BadRecords` skips or fails by policy and counts by reason.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from datasets import Dataset, Features, IterableDataset, Value
from datasets.distributed import split_dataset_by_node

from mllm.errors import InputError
from mllm.processor import MessageError, validate_messages

logger = logging.getLogger(__name__)

RECORD_SUFFIXES = (".jsonl", ".parquet")
BadRecordPolicy = Literal["skip", "fail"]
REASONS = (
    "invalid_json", "malformed_message", "missing_media", "corrupt_media", "too_long", "invalid_sample", "duplicate_id",
)

# One row per record line; `messages` and `meta` are JSON text, `error` is set when the line did not parse.
FEATURES = Features(
    {
        "id": Value("string"),
        "where": Value("string"),  # "file.jsonl:42" or "file.parquet:row 41"
        "base_dir": Value("string"),  # the record file's directory: media paths resolve against it
        "corpus": Value("string"),
        "task": Value("string"),
        "messages": Value("string"),
        "meta": Value("string"),
        "error": Value("string"),
    }
)


@dataclass
class Record:
    """One checked conversation, ready for `Processor.encode(messages, base_dir=base_dir)`."""

    id: str
    where: str
    base_dir: str
    messages: list[dict]
    corpus: str | None = None
    task: str | None = None
    meta: dict = field(default_factory=dict)


class BadRecordError(InputError, ValueError):
    """A record that cannot be used. str(e) == f"{where}: {reason}: {detail}"."""

    def __init__(self, reason: str, where: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {reason!r} (known: {', '.join(REASONS)})")
        super().__init__(f"{where}: {reason}: {detail}")
        self.reason, self.where, self.detail = reason, where, detail

    def __reduce__(self):  # three-argument init: pickling needs all of them
        return type(self), (self.reason, self.where, self.detail)


class NoRecordsError(InputError, ValueError):
    """Record files none of which holds a record."""

    def __init__(self, files: Sequence[str]):
        super().__init__(f"no records in {', '.join(files)}: {'it is' if len(files) == 1 else 'every file is'} empty")
        self.files = list(files)

    def __reduce__(self):
        return type(self), (self.files,)


class BadRecords:
    """The bad-record policy and its report: under "skip" each bad record is logged and kept here,
    under "fail" the first one is raised."""

    def __init__(self, policy: BadRecordPolicy = "skip"):
        if policy not in ("skip", "fail"):
            raise ValueError(f"bad-record policy must be 'skip' or 'fail', got {policy!r}")
        self.policy = policy
        self.seen = 0  # records looked at (by `iter_records`)
        self.skipped: list[BadRecordError] = []

    def __call__(self, error: BadRecordError) -> None:
        if self.policy == "fail":
            raise error
        self.skipped.append(error)
        logger.warning("skipped record %s", error)

    @property
    def counts(self) -> Counter:
        """reason -> number of skipped records."""
        return Counter(e.reason for e in self.skipped)

    def summary(self) -> str:
        if not self.skipped:
            return f"no bad records among {self.seen}"
        by_reason = ", ".join(f"{reason} {n}" for reason, n in sorted(self.counts.items()))
        return f"skipped {len(self.skipped)} of {self.seen} records ({by_reason})"


# ---- reading ------------------------------------------------------------------------------------


def record_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Files, directories (every .jsonl/.parquet below, sorted) or glob patterns -> absolute file paths."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files = []
    for p in map(str, paths):
        if os.path.isdir(p):
            found = sorted(str(f) for f in Path(p).rglob("*") if f.suffix in RECORD_SUFFIXES and f.is_file())
        else:
            found = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not found:
            raise FileNotFoundError(f"{p}: no record files ({' or '.join(RECORD_SUFFIXES)}) found")
        for f in found:
            if Path(f).suffix not in RECORD_SUFFIXES:
                raise ValueError(f"{f}: a record file must end in {' or '.join(RECORD_SUFFIXES)}")
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f}: no such record file")
        files += [os.path.abspath(f) for f in found]
    return files


def read_records(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    streaming: bool = False,
    rank: int = 0,
    world_size: int = 1,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset | IterableDataset:
    """Record files -> a `datasets` Dataset (or IterableDataset when `streaming`) of FEATURES rows.

    With `world_size` > 1 each rank gets its own part (`split_dataset_by_node`):
    of a Dataset, the rank-th of world_size contiguous blocks of rows; of an
    IterableDataset, whole files when their number divides evenly, else every
    world_size-th row. The map-style table is cached under `cache_dir`
    (datasets' default otherwise), keyed by each file's path, size, inode,
    modification and status-change times: a rewrite that keeps size and
    modification time (cp -p, rsync -t, tar x) still changes the inode or ctime.
    """
    files = record_files(paths)
    if empty := empty_record_files(files):
        if len(empty) == len(files):  # datasets would say `Instruction "train" corresponds to no data!`
            raise NoRecordsError(files)
        logger.warning("no records in %s: empty", ", ".join(empty))
    kwargs = {"features": FEATURES, "gen_kwargs": {"files": files}}
    if streaming:
        ds = IterableDataset.from_generator(_rows, **kwargs)
    else:
        cache_dir = None if cache_dir is None else str(cache_dir)
        ds = Dataset.from_generator(_rows, cache_dir=cache_dir, fingerprint=_fingerprint(files), **kwargs)
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ds


def empty_record_files(files: Sequence[str]) -> list[str]:
    """The record files among `files` that hold no record: only blank lines (JSONL), no row (Parquet)."""
    return [f for f in files if not _holds_records(f)]


def _holds_records(file: str) -> bool:
    if file.endswith(".parquet"):
        return pq.ParquetFile(file).metadata.num_rows > 0
    with open(file, "rb") as f:
        return any(line.strip() for line in f)  # stops at the first record


def _fingerprint(files: list[str]) -> str:
    h = hashlib.sha256(f"mllm-records-v1\0{FEATURES}\0".encode())  # bump v1 when the rows change
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0".encode())
    return h.hexdigest()


def _rows(files: list[str]) -> Iterator[dict]:
    for file in files:
        yield from (_parquet_rows if file.endswith(".parquet") else _jsonl_rows)(file)


def _jsonl_rows(file: str) -> Iterator[dict]:
    with open(file, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines hold no record
            where = f"{file}:{n}"
            try:
                obj = json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                yield _error_row(file, where, f"invalid JSON: {e}")
                continue
            yield _row(obj, file, where)


def _parquet_rows(file: str) -> Iterator[dict]:
    n = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=256):
        for obj in batch.to_pylist():
            where = f"{file}:row {n}"
            n += 1
            if isinstance(obj.get("messages"), str):  # messages stored as JSON text
                try:
                    obj["messages"] = json.loads(obj["messages"])
                except ValueError as e:
                    yield _error_row(file, where, f"invalid JSON in 'messages': {e}")
                    continue
            yield _row(_plain(obj), file, where)


def _plain(x: Any) -> Any:
    """JSON-ready data from an Arrow row: binary -> base64 text, null struct fields dropped."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, (bytes, bytearray)):
        return base64.b64encode(x).decode("ascii")
    return x


def _row(obj: Any, file: str, where: str) -> dict:
    if not isinstance(obj, dict):
        return _error_row(file, where, f"a record must be a JSON object, got {type(obj).__name__}")
    messages = obj.get("messages")
    if messages is None and isinstance(obj.get("text"), str):
        messages = [{"role": "assistant", "content": [{"type": "text", "text": obj["text"]}]}]
    return {
        "id": where if obj.get("id") in (None, "") else str(obj["id"]),  # an id of 0 is an id
        "where": where,
        "base_dir": os.path.dirname(file),
        "corpus": _optional_str(obj.get("corpus")),
        "task": _optional_str(obj.get("task")),
        "messages": json.dumps(messages, ensure_ascii=False, default=str),
        "meta": json.dumps(obj.get("meta") or {}, ensure_ascii=False, default=str),
        "error": None,
    }


def _error_row(file: str, where: str, error: str) -> dict:
    return dict.fromkeys(FEATURES, None) | {"id": where, "where": where, "base_dir": os.path.dirname(file), "error": error}


def _optional_str(x: Any) -> str | None:
    return None if x is None else str(x)


# ---- checking -----------------------------------------------------------------------------------


def check_record(row: dict) -> Record:
    """A row of `read_records` -> Record; raises BadRecordError for invalid JSON, a malformed
    message or a media path that does not exist. (Corrupt media and over-long samples show up
    when encoding: see `mllm.data.loader`.)"""
    where = row["where"]
    if row["error"] is not None:
        raise BadRecordError("invalid_json", where, row["error"])
    messages = json.loads(row["messages"])
    try:
        turns = validate_messages(messages)
    except MessageError as e:
        raise BadRecordError("malformed_message", where, str(e)) from e
    for i, (_, parts) in enumerate(turns):
        for j, part in enumerate(parts):
            path = media_path(part, row["base_dir"])
            if path is not None and not path.is_file():
                raise BadRecordError("missing_media", where, f"messages[{i}].content[{j}]: no such file {path}")
    meta = json.loads(row["meta"])
    if not isinstance(meta, dict):  # readers look keys up in it (tasks, answers, question types)
        raise BadRecordError("malformed_message", where, f"meta must be an object, got {type(meta).__name__}")
    return Record(row["id"], where, row["base_dir"], messages, row["corpus"], row["task"], meta)


def media_path(part: dict, base_dir: str | os.PathLike) -> Path | None:
    """The file a media part names (resolved against base_dir), or None if it names no file."""
    if part["type"] == "text":
        return None
    value = part.get("path", part.get(part["type"]))
    if not isinstance(value, (str, os.PathLike)):
        return None
    return Path(base_dir) / value  # an absolute `value` stays absolute


def iter_records(rows, bad: BadRecords) -> Iterator[Record]:
    """The good records of `rows`; each bad one goes to `bad` (skipped and counted, or raised)."""
    for row in rows:
        bad.seen += 1
        try:
            yield check_record(row)
        except BadRecordError as e:
            bad(e)
