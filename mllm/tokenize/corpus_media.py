"""The media files of a built corpus, as the tokenizer recipes read them.

    corpus_media(corpora, "digits", "train", "image")  -> {path: meta of its first record}, in record order
    media_captions(corpora, "digits", "train", "image") -> {path: [the captions its caption records give]}
    shuffled_batches(paths, 64, seed=0, cache_size=8000, load=load_image)  -> endless shuffled epochs
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

M = TypeVar("M")


def corpus_media(corpora_dir: Path, corpus: str, split: str, modality: str) -> dict[Path, dict]:
    """The distinct `modality` files a corpus' split refers to, in record order, each with its first record's meta."""
    records = Path(corpora_dir) / corpus / f"{split}.jsonl"  # an absolute `corpus` replaces corpora_dir
    if not records.is_file():
        raise FileNotFoundError(f"{records}: no such corpus split (build the corpora with `mllm data build`)")
    media: dict[Path, dict] = {}
    for line in records.read_text().splitlines():
        record = json.loads(line)
        for message in record.get("messages", []):
            for part in message["content"]:
                if part.get("type") == modality and "path" in part:
                    media.setdefault(records.parent / part["path"], record.get("meta", {}))
    return media


def media_captions(corpora_dir: Path, corpus: str, split: str, modality: str) -> dict[Path, list[str]]:
    """The reference captions of each `modality` file: the assistant's text in the split's `*_caption` records."""
    records = Path(corpora_dir) / corpus / f"{split}.jsonl"
    captions: dict[Path, list[str]] = {}
    for line in records.read_text().splitlines():
        record = json.loads(line)
        if not record.get("task", "").endswith("_caption"):
            continue
        messages = record["messages"]
        media = [part["path"] for part in messages[0]["content"] if part.get("type") == modality and "path" in part]
        text = " ".join(part["text"] for part in messages[-1]["content"] if part.get("type") == "text")
        if len(media) == 1 and text:
            captions.setdefault(records.parent / media[0], []).append(text)
    return captions


def cached_loader(paths: list[Path], cache_size: int, load: Callable[[Path], M],
                  cache: dict[int, M] | None = None) -> Callable[[int], M]:
    """index -> loaded medium; the first `cache_size` distinct ones stay in memory, in `cache` (index into `paths`
    -> medium) when given: loaders over the same paths share their decoding."""
    cache = {} if cache is None else cache

    def get(j: int) -> M:
        if j in cache:
            return cache[j]
        medium = load(paths[j])
        if len(cache) < cache_size:
            cache[j] = medium
        return medium

    return get


def shuffled_indices(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless shuffled epochs of `batch_size` indices into range(n): full batches (one short one if too few)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, max(len(order) - batch_size, 0) + 1, batch_size):
            yield order[i:i + batch_size]


def indexed_batches(paths: list[Path], batch_size: int, seed: int, cache_size: int, load: Callable[[Path], M],
                    cache: dict[int, M] | None = None) -> Iterator[tuple[list[int], list[M]]]:
    """Endless shuffled epochs of `batch_size` loaded media (`cached_loader` keeps the first `cache_size`), each
    batch with its media's indices into `paths`."""
    get = cached_loader(paths, cache_size, load, cache)
    for batch in shuffled_indices(len(paths), batch_size, seed):
        yield batch, [get(j) for j in batch]


def shuffled_batches(paths: list[Path], batch_size: int, seed: int, cache_size: int,
                     load: Callable[[Path], M], cache: dict[int, M] | None = None) -> Iterator[list[M]]:
    """`indexed_batches` without the indices."""
    return (media for _, media in indexed_batches(paths, batch_size, seed, cache_size, load, cache))


def evenly_spaced(n: int, limit: int | None) -> list[int]:
    """`limit` indices spread over range(n) (all of them without a limit): every class of a class-ordered split."""
    if limit is None or limit >= n:
        return list(range(n))
    return np.linspace(0, n - 1, limit).round().astype(int).tolist()
