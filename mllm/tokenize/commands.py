"""`mllm tokenize train | encode | decode | eval`."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mllm.config import to_dict
from mllm.detokenizers import load_detokenizer
from mllm.files import atomic_write, atomic_write_text
from mllm.media import Audio, Image, MediaError, Video, load_media, save_audio, save_image, save_video
from mllm.tokenize.recipes import RECIPE_FILE, load_recipe
from mllm.tokenizers import load_media_tokenizer

SUFFIX = {"image": ".png", "audio": ".wav", "video": ".mp4"}
EVAL_SPLITS = ("test", "validation")  # the held-out splits; judges and recipes learn from train


def train(recipe_path: str | os.PathLike, corpora: Path, out: Path, overrides: list[str] | None = None) -> dict:
    """Validate the recipe before any work, train, and record the recipe beside the weights."""
    recipe, cfg = load_recipe(recipe_path, overrides)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # a previous run's would mark this one done if it fails
    atomic_write_text(out / RECIPE_FILE, yaml.safe_dump({"recipe": recipe.name, "config": to_dict(cfg)}, sort_keys=False))
    metrics = recipe.train(cfg, corpora, out)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))  # last: it marks the training done
    return metrics


def evaluate(trained: Path, corpora: Path, report: Path, limit: int | None = None, split: str = "test") -> dict:
    """A trained directory's recipe evaluation on a held-out split of the built corpora, saved as report/metrics.json."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    recipe, _ = load_recipe(trained / RECIPE_FILE)  # a ConfigError names a directory `train` did not write
    metrics = {"split": split, **recipe.evaluate(trained, corpora, report, limit, split)}
    report.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def encode(tokenizer_dir: Path, files: list[Path], out: Path) -> Path:
    """Encode media files into one safetensors file keyed by file name."""
    tokenizer = load_media_tokenizer(tokenizer_dir)
    named: dict[str, Path] = {}
    for path in map(Path, files):  # before any encoding: one key per name, or a file would be lost
        if named.setdefault(path.name, path) != path:
            raise MediaError(str(path), f"has the file name of {named[path.name]}: the token file keys entries by name")
    tokens = {}
    with torch.no_grad():
        for name, path in tqdm(named.items(), desc=f"encode {tokenizer.modality}"):
            tokens[name] = tokenizer.encode(load_media(path, tokenizer.modality)).contiguous()
    atomic_write(Path(out), partial(save_file, tokens))
    return out


def decode(detokenizer_dir: Path, tokens_file: Path, out: Path, guidance: float | None, steps: int | None, seed: int) -> list[Path]:
    """Decode every entry of a safetensors token file into a media file under `out`."""
    detokenizer = load_detokenizer(detokenizer_dir)
    entries = load_file(tokens_file)
    paths: dict[Path, str] = {}
    for key in entries:  # before any decoding: x.png and x.jpg would both become x.png
        path = out / (Path(key).stem + SUFFIX[detokenizer.modality])
        if paths.setdefault(path, key) != key:
            raise MediaError(f"{tokens_file}", f"entries {paths[path]!r} and {key!r} would both decode to {path.name}")
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, key in tqdm(paths.items(), desc=f"decode {detokenizer.modality}"):
            try:
                media = detokenizer.decode(entries[key], guidance=guidance, steps=steps, generator=generator)
            except ValueError as e:  # the de-tokenizer's checks of its tokens: shape, dtype, range, NaN
                raise MediaError(f"{tokens_file}[{key!r}]", str(e)) from e
            _save(media, path)
    return list(paths)


def _save(media: Image | Audio | Video, path: Path) -> None:
    {Image: save_image, Audio: save_audio, Video: save_video}[type(media)](media, path)
