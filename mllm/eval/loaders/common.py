"""What the format readers share: checked media paths, JSON lines with file:line, required fields."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mllm.data.records import BadRecordError, BadRecords
from mllm.eval.tasks import MediaRef, Modality


def media(kind: Modality, path: Path, where: str, segment: tuple[float, float] | None = None) -> MediaRef:
    """A MediaRef to an existing file (or frame folder, for video); a missing one is a bad item."""
    if not (path.is_file() or (kind == "video" and path.is_dir())):
        raise BadRecordError("missing_media", where, f"no such {kind} file {path}")
    return MediaRef(kind, str(path.resolve()), segment)


def field(row: Any, key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """row[key], which must be present and of `kind`; else a bad item naming the key."""
    if not isinstance(row, dict):
        raise BadRecordError("malformed_message", where, f"expected a JSON object, got {type(row).__name__}")
    if key not in row:
        raise BadRecordError("malformed_message", where, f"missing field {key!r}")
    value, kinds = row[key], kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise BadRecordError("malformed_message", where, f"field {key!r} must be {names}, got {type(value).__name__}")
    return value


def json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """(file:line, parsed object) for each non-blank line; a line that is not JSON gives its error instead."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                where = f"{path}:{n}"
                try:
                    yield where, json.loads(line)
                except ValueError as e:
                    yield where, BadRecordError("invalid_json", where, str(e))


def read_json(path: Path) -> Any:
    """A whole JSON file; an unreadable one is an error of the task, not of one item."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no such file") from e
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


def collect(rows, build, bad: BadRecords) -> list:
    """build(where, row) for each (where, row); a BadRecordError (or a row that is one) goes to `bad`."""
    items = []
    for where, row in rows:
        bad.seen += 1
        try:
            if isinstance(row, BadRecordError):
                raise row
            items.append(build(where, row))
        except BadRecordError as e:
            bad(e)
    return items
