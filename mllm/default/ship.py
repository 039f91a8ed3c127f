"""Package trained default-model checkpoints compactly: float16 safetensors, de-tokenizers beside the model.

    ship(runs/default/multimodal/final, tokenizers, out/gmm)     # a complete checkpoint directory
    ship(runs/default/diffusion_head/final, tokenizers, out/diffusion, shared=out/gmm)

Every float32 tensor is stored as float16 (halving the size); loading upcasts to
the float32 the configs name. A variant `shared` with another keeps only its own
model and processor files, and of its weights only those that differ from
`shared`'s; its media tokenizers, de-tokenizers and the equal weights are
`shared`'s, put back when the variant is resolved (see `mllm.default.paths`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mllm.checkpoint import DETOKENIZERS_DIR, publish_directory
from mllm.default.paths import SHARED_DIRS, SHARED_FILE, WEIGHTS_FILE
from mllm.processor import MEDIA_TOKENIZERS_DIR


def rewrite_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """Rewrite one safetensors file in place, atomically, with the tensors `change` makes of its own (metadata kept)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tmp = path.with_suffix(".tmp")
    save_file(change(load_file(path)), tmp, metadata=metadata)
    os.replace(tmp, path)


def to_float16(path: Path) -> None:
    """Rewrite one safetensors file with its float32 tensors as float16."""
    rewrite_tensors(path, lambda tensors: {k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()})


def drop_equal_tensors(path: Path, source: Path) -> list[str]:
    """Rewrite safetensors file `path` without the tensors `source` holds bit for bit; their names, sorted."""
    theirs, equal = load_file(source), set()

    def drop(own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        equal.update(k for k, v in own.items() if k in theirs and theirs[k].dtype == v.dtype and torch.equal(theirs[k], v))
        return {k: v for k, v in own.items() if k not in equal}

    rewrite_tensors(path, drop)
    return sorted(equal)


def drop_build_paths(config: dict) -> dict:
    """`config` without the `_name_or_path` entries transformers records at any depth: they name
    directories of the machine that built the checkpoint."""
    return {k: drop_build_paths(v) if isinstance(v, dict) else v for k, v in config.items() if k != "_name_or_path"}


def ship(checkpoint: Path, detokenizers: dict[str, Path], out: Path, shared: Path | None = None,
         media_tokenizers: dict[str, Path] | None = None) -> Path:
    """Copy `checkpoint` (+ each modality's de-tokenizer dir) into `out` with float16 weights and configs
    that name no build directory. `media_tokenizers` (modality -> a saved media tokenizer) replace the
    checkpoint's own: one that writes the same tokens for more kinds of input (the ink stages')."""
    for modality, src in (media_tokenizers or {}).items():
        if not (checkpoint / MEDIA_TOKENIZERS_DIR / modality).is_dir():
            raise ValueError(f"ship: {checkpoint} has no {modality} media tokenizer to replace with {src}")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(checkpoint, tmp)
        if shared is None:
            for modality, src in detokenizers.items():
                shutil.copytree(src, tmp / DETOKENIZERS_DIR / modality)
            for modality, src in (media_tokenizers or {}).items():
                shutil.rmtree(tmp / MEDIA_TOKENIZERS_DIR / modality)
                shutil.copytree(src, tmp / MEDIA_TOKENIZERS_DIR / modality)
        else:
            for name in SHARED_DIRS:
                shutil.rmtree(tmp / name, ignore_errors=True)
        for file in tmp.rglob("*.safetensors"):
            to_float16(file)
        if shared is not None:
            borrowed = drop_equal_tensors(tmp / WEIGHTS_FILE, shared / WEIGHTS_FILE)
            (tmp / SHARED_FILE).write_text(json.dumps({"media_from": os.path.relpath(shared, out),
                                                       "borrowed_tensors": borrowed}, indent=1) + "\n")
        for file in tmp.rglob("config.json"):
            file.write_text(json.dumps(drop_build_paths(json.loads(file.read_text())), indent=2) + "\n")
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def install(shipped: Path, dst: Path) -> Path:
    """Copy the shipped variants `shipped` into `dst` (the package's checkpoint directory) whole or not at all:
    a copy that fails half-way leaves the checkpoint that was there."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(shipped, tmp)
        publish_directory(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
