"""What a recipe trains on: its record tables and its token cache, read and filled as its run does.

    train, validation = recipe_records(cfg)            # tasks at `data.repeat` 0 left out
    encode_recipe_media(cfg, ["image"])                # encode ahead, e.g. while other work runs

A run encodes every medium of its records that is not cached yet before its
first step, one at a time. `encode_recipe_media` does that part ahead of the run,
for some modalities or all, with the tokenizers the run will load (so the same
cache directories); the run then finds those media cached. `mllm default train`
uses it to encode the multimodal stage's images, clips and sounds beside the stages
still training.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from datasets import Dataset, concatenate_datasets

from mllm.checkpoint import build_media_tokenizers
from mllm.config import ConfigError
from mllm.data.cache import CacheStats, TokenCache
from mllm.data.records import read_records, record_files
from mllm.processor import Processor
from mllm.tokenizers import MediaTokenizer, load_media_tokenizer
from mllm.train.recipe import FinetuneConfig, data_root, with_absolute_paths


def recipe_cache_dir(cfg: FinetuneConfig) -> Path:
    """Where the run caches record tables (`records/`) and media tokens (`tokens/`)."""
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.output_dir) / "cache"


def recipe_records(cfg: FinetuneConfig) -> tuple[Dataset, Dataset | None]:
    """The train records (only `data.tasks`, if named; tasks at `data.repeat` rate 0 left out) and the
    validation records (None when the recipe names none), as `datasets` tables cached under the cache dir.
    Raises ConfigError for a `data.tasks` entry that no train or validation record has."""
    root, tables = data_root(cfg), recipe_cache_dir(cfg) / "records"

    def records(paths: list[str]) -> Dataset | None:
        return read_records([f for p in paths for f in record_files(root / p)], cache_dir=tables) if paths else None

    train, validation = records(cfg.data.train), records(cfg.data.validation)
    if tasks := set(cfg.data.tasks):
        present = {t for ds in (train, validation) if ds is not None for t in ds.unique("task")}
        if unknown := sorted(tasks - present):
            known = ", ".join(sorted(t for t in present if t is not None)) or "none"
            raise ConfigError("data.tasks", f"no record has the task {', '.join(unknown)} (the records' tasks: {known})")
        train, validation = (None if ds is None else ds.filter(lambda task: task in tasks, input_columns="task")
                             for ds in (train, validation))
        if not len(train):
            raise ConfigError("data.tasks", f"no training record has the task {', '.join(sorted(tasks))}")
    return _leave_out_rate_zero(train, cfg), validation


def _leave_out_rate_zero(train: Dataset, cfg: FinetuneConfig) -> Dataset:
    """The train records of every task whose `data.repeat` rate is above 0: a rate of 0 leaves its task out
    before any of its media is encoded."""
    repeat, default = cfg.data.repeat, cfg.data.repeat_default
    tasks = set(train.unique("task"))
    missing = sorted(set(repeat) - tasks)
    if missing:
        raise ConfigError("data.repeat", f"no training record has the task {', '.join(missing)}")
    left_out = {task for task in tasks if repeat.get(task, default) == 0}
    if left_out == tasks:
        raise ConfigError("data.repeat", f"every training task ({', '.join(sorted(tasks))}) has rate 0: nothing to train on")
    return train.filter(lambda task: task not in left_out, input_columns="task") if left_out else train


def recipe_media_tokenizers(cfg: FinetuneConfig, modalities: Collection[str] | None = None) -> dict[str, MediaTokenizer]:
    """The media tokenizers the recipe's run encodes with: its model's, or those saved with `init_from`.

    With `modalities` that the model loads from directories, only those are loaded, so an encoding need not
    wait for the other tokenizers to be trained. (A tokenizer built from options is built with all the others:
    its weights depend on those built before it.)"""
    if cfg.model is None:
        return Processor.from_pretrained(cfg.init_from).media_tokenizers
    media = cfg.model.media
    if modalities is not None and all(m in media and media[m].path for m in modalities):
        return {m: load_media_tokenizer(media[m].path) for m in modalities}
    return build_media_tokenizers(cfg.model)[0]


def recipe_token_cache(cfg: FinetuneConfig, tokenizers: dict[str, MediaTokenizer]) -> TokenCache:
    """The run's token cache (`<cache dir>/tokens`) for `tokenizers`, encoding `data.encode_batch` media per call."""
    return TokenCache(recipe_cache_dir(cfg) / "tokens", tokenizers, batch_sizes=cfg.data.encode_batch)


def encode_recipe_media(cfg: FinetuneConfig, modalities: Collection[str] | None = None, *,
                        progress: bool = True) -> CacheStats:
    """Encode the media of `modalities` (default: every one the recipe tokenizes) in the recipe's train and
    validation records into its token cache, as its run would before its first step."""
    cfg = with_absolute_paths(cfg)
    tokenizers = recipe_media_tokenizers(cfg, modalities)
    wanted = set(tokenizers) if modalities is None else set(modalities)
    if unknown := sorted(wanted - set(tokenizers)):
        raise ConfigError("model.media", f"the recipe tokenizes no {', '.join(unknown)} "
                          f"(it tokenizes: {', '.join(sorted(tokenizers)) or 'nothing'})")
    cache = recipe_token_cache(cfg, {m: tokenizers[m] for m in sorted(wanted)})
    records = concatenate_datasets([ds for ds in recipe_records(cfg) if ds is not None])  # train, then validation
    return cache.encode_records(records, progress=progress)
