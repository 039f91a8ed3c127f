"""Where the embedded default model lives: `mllm/default/checkpoint/<variant>/`, shipped with the package.

    default_checkpoint()             # the GMM-head variant: what chat, serve, eval and demo load without --model
    default_checkpoint("diffusion")  # the diffusion-head variant
    with_shared_media(Path("runs/default/checkpoint/diffusion"))  # any variant directory, e.g. a build's own

A variant that shares its media tokenizers and de-tokenizers with another
(`shared.json`, written by `mllm.default.ship`) is completed once into the mllm
cache with links to them, so that every loader sees one ordinary checkpoint directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from mllm.checkpoint import DETOKENIZERS_DIR
from mllm.data.sources import cache_dir

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoint"
VARIANTS = ("gmm", "diffusion")
SHARED_FILE = "shared.json"  # {"media_from": "../gmm"}
SHARED_DIRS = ("media_tokenizers", DETOKENIZERS_DIR)  # what a shared variant borrows


def default_checkpoint(variant: str = "gmm", root: Path = CHECKPOINTS) -> Path:
    """The directory of a default-model variant, ready for `load_checkpoint` / `Pipeline.from_pretrained`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown default-model variant {variant!r} (known: {', '.join(VARIANTS)})")
    path = root / variant
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the embedded default model is not installed (remake it: `mllm default train --ship`)")
    return with_shared_media(path)


def with_shared_media(path: Path) -> Path:
    """A checkpoint directory as loaders expect it: `path` itself, or, when it borrows its media tokenizers and
    de-tokenizers from another variant (`shared.json`), a completed copy of links in the mllm cache."""
    if not (Path(path) / SHARED_FILE).is_file():
        return path
    path = Path(path).absolute()
    source = (path / json.loads((path / SHARED_FILE).read_text())["media_from"]).resolve()
    key = hashlib.sha256(f"{path}\0{source}\0{(path / 'model.safetensors').stat().st_mtime_ns}".encode()).hexdigest()[:12]
    complete = cache_dir() / "default" / f"{path.name}-{key}"
    if complete.is_dir():
        return complete
    complete.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=complete.parent, prefix=f".{complete.name}-"))
    try:
        for entry in path.iterdir():
            if entry.name != SHARED_FILE:
                os.symlink(entry, tmp / entry.name)
        for name in SHARED_DIRS:
            if (source / name).is_dir():
                os.symlink(source / name, tmp / name)
        os.replace(tmp, complete)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not complete.is_dir():  # else another process completed it first
            raise
    return complete
