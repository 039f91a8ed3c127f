"""Recipes: how each media tokenizer (with its de-tokenizer) is trained and evaluated.

A recipe YAML in the top-level `tokenizers/` folder names its recipe and holds
that recipe's typed config:

    recipe: image_fsq          # a name from list_recipes()
    config: {...}              # the recipe's config dataclass

`mllm tokenize train tokenizers/image_fsq_tiny.yaml` runs `recipe.train`, which
writes into one output directory:

    media_tokenizer/   (load_media_tokenizer)      detokenizer/   (load_detokenizer)
    recipe.yaml        loss.png                     metrics.json

and `mllm tokenize eval DIR` runs `recipe.evaluate` on the test split (or `--split validation`, the one
to choose recipes on),
writing metrics and pictures (reconstruction grids, frame strips,
spectrograms) into a report directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mllm.config import ConfigError, apply_override, from_dict, read_yaml
from mllm.registry import Registry

RECIPE_FILE = "recipe.yaml"


@dataclass(frozen=True)
class Recipe:
    name: str
    config_class: type
    # train(cfg, corpora_dir, out_dir) -> metrics; writes the layout above
    train: Callable[[Any, Path, Path], dict]
    # evaluate(trained_dir, corpora_dir, report_dir, limit, split) -> metrics on that split ("test", "validation")
    evaluate: Callable[[Path, Path, Path, int | None, str], dict]


RECIPES: Registry[Recipe] = Registry("tokenizer recipe")


def list_recipes() -> list[str]:
    return RECIPES.names()


def register_recipe(recipe: Recipe) -> Recipe:
    RECIPES.register(recipe.name)(lambda: recipe)
    return recipe


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> tuple[Recipe, Any]:
    """Read a recipe YAML: the recipe it names and its config, validated; overrides apply under `config.`."""
    data = read_yaml(path, "recipe")
    if not isinstance(data, dict) or set(data) - {"recipe", "config"} or "recipe" not in data:
        raise ConfigError("", "a recipe file has exactly the keys 'recipe' and 'config'", str(path))
    if data["recipe"] not in RECIPES:
        raise ConfigError("recipe", f"unknown recipe {data['recipe']!r} (known: {', '.join(list_recipes())})", str(path))
    recipe = RECIPES.build(data["recipe"])
    config = data.get("config") or {}
    for item in overrides or []:
        apply_override(config, item)
    return recipe, from_dict(recipe.config_class, config, source=str(path))
