"""Files written whole or not at all, and the leftovers of processes killed while writing them.

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))   # any writer, into a sibling, then renamed
    atomic_write_text(path, text)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp), fsync, then rename over `path`: readers see the old file or the whole new one (without the
    fsync, a crash after the rename could publish an empty file). A failed write leaves no sibling behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def process_gone(pid: int) -> bool:
    """Whether no process has this pid (its temporary files are leftovers); another user's live one is not gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
