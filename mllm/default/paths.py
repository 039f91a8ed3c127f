"""Where the embedded default model lives: `mllm/default/checkpoint/<variant>/`, shipped with the package.

    default_checkpoint()             # the GMM-head variant: what chat, serve, eval and demo load without --model
    default_checkpoint("diffusion")  # the diffusion-head variant
    with_shared_parts(Path("runs/default/checkpoint/diffusion"))  # any variant directory, e.g. a build's own

A variant that shares parts with another (`shared.json`, written by `mllm.default.ship`) is completed once
into the mllm cache, so that every loader sees one ordinary checkpoint directory: its media tokenizers and
de-tokenizers are linked in, and the weights it borrows (`borrowed_tensors`, e.g. the language model a variant
did not retrain) are merged with its own into one `model.safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from mllm.checkpoint import DETOKENIZERS_DIR
from mllm.processor import MEDIA_TOKENIZERS_DIR
from mllm.data.sources import cache_dir

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoint"
VARIANTS = ("gmm", "diffusion")
SHARED_FILE = "shared.json"  # {"media_from": "../gmm", "borrowed_tensors": ["language_model.lm_head.weight", ...]}
WEIGHTS_FILE = "model.safetensors"
SHARED_DIRS = (MEDIA_TOKENIZERS_DIR, DETOKENIZERS_DIR)  # what a shared variant borrows


def default_checkpoint(variant: str = "gmm", root: Path = CHECKPOINTS) -> Path:
    """The directory of a default-model variant, ready for `load_checkpoint` / `Pipeline.from_pretrained`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown default-model variant {variant!r} (known: {', '.join(VARIANTS)})")
    path = root / variant
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the embedded default model is not installed (remake it: `mllm default train --ship`)")
    return with_shared_parts(path)


def with_shared_parts(path: Path) -> Path:
    """A checkpoint directory as loaders expect it: `path` itself, or, when it borrows parts from another
    variant (`shared.json`), a completed copy in the mllm cache: links to its own files and the other's media
    tokenizers and de-tokenizers, and its weights merged with the borrowed ones."""
    if not (Path(path) / SHARED_FILE).is_file():
        return path
    path = Path(path).absolute()
    shared = json.loads((path / SHARED_FILE).read_text())
    if not isinstance(shared, dict) or not isinstance(shared.get("media_from"), str):
        raise ValueError(f"{path / SHARED_FILE}: wants {{\"media_from\": \"<variant dir>\"}}, got {shared!r}")
    source = (path / shared["media_from"]).resolve()
    borrowed = shared.get("borrowed_tensors", [])
    stamps = [(path / WEIGHTS_FILE).stat().st_mtime_ns] + ([(source / WEIGHTS_FILE).stat().st_mtime_ns] if borrowed else [])
    key = hashlib.sha256(f"{path}\0{source}\0{stamps}".encode()).hexdigest()[:12]
    complete = cache_dir() / "default" / f"{path.name}-{key}"
    if complete.is_dir():
        return complete
    complete.parent.mkdir(parents=True, exist_ok=True)
    prune_completions(complete.parent, path)
    tmp = Path(tempfile.mkdtemp(dir=complete.parent, prefix=f".{complete.name}-"))
    try:
        for entry in path.iterdir():
            if entry.name != SHARED_FILE and not (borrowed and entry.name == WEIGHTS_FILE):
                os.symlink(entry, tmp / entry.name)
        if borrowed:
            merge_weights(path / WEIGHTS_FILE, source / WEIGHTS_FILE, borrowed, tmp / WEIGHTS_FILE)
        for name in SHARED_DIRS:
            if (source / name).is_dir():
                os.symlink(source / name, tmp / name)
        os.replace(tmp, complete)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (isinstance(e, OSError) and complete.is_dir()):  # else another process completed it first
            raise
    return complete


def prune_completions(cache: Path, path: Path) -> None:
    """Remove the completed copies in `cache` that no loader will ask for again: those of `path`, which is
    about to be completed anew because its weights changed, and those whose variant directory is gone (a
    deleted clone or build). Each completion is 7.6 MB for the default model; without this every upgrade, clone
    and test build would leave one behind. Copies in progress (hidden names) are left to their writers."""
    for old in cache.iterdir():
        link = old / "config.json"  # every completion links its variant's config.json
        if old.name.startswith(".") or not link.is_symlink():
            continue
        if Path(os.readlink(link)).parent == path or not link.exists():
            shutil.rmtree(old, ignore_errors=True)


def merge_weights(own: Path, source: Path, borrowed: list[str], out: Path) -> None:
    """Write `own`'s tensors and the `borrowed` ones of `source` into one safetensors file `out`."""
    with safe_open(str(own), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(source), framework="pt") as f:
        missing = sorted(set(borrowed) - set(f.keys()))
        if missing:
            raise ValueError(f"{own.parent / SHARED_FILE}: {source} has no tensor {', '.join(missing[:5])}"
                             f"{' …' if len(missing) > 5 else ''} to borrow ({len(missing)} missing)")
        clash = sorted(set(borrowed) & set(tensors))
        if clash:
            raise ValueError(f"{own.parent / SHARED_FILE}: {own} has its own {', '.join(clash[:5])}; a tensor is "
                             "either the variant's or borrowed")
        tensors |= {k: f.get_tensor(k) for k in borrowed}
    save_file(tensors, out, metadata=metadata)
