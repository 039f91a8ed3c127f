"""The finetuning tests' tiny corpus, text tokenizer and recipe builder (fixtures shared by their files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mllm.media import Image, save_image
from mllm.tokenizers.text import train_text_tokenizer
from mllm.train import finetune, load_recipe
from tests.conftest import TINY_LMS


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "finetune" / "recipes").glob("*.yaml"))
WORDS = "zero one two three four five six seven eight nine".split()
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "black": (0, 0, 0)}


# ---- a tiny corpus, tokenizer and recipe --------------------------------------------------------


def write_corpus(root: Path) -> None:
    """Text, image captions and image generation, in the built corpora's record format."""
    rng = np.random.default_rng(0)
    (root / "media").mkdir(parents=True)
    understand, generate, text = [], [], []
    for i in range(24):
        name = list(COLOURS)[i % 4]
        pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        save_image(Image(pixels), root / "media" / f"{i}.png")
        image = {"type": "image", "path": f"media/{i}.png"}
        understand.append({"id": f"u{i}", "task": "image_caption", "messages": [
            {"role": "user", "content": [image, {"type": "text", "text": "What colour is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"It is {name}."}]}]})
        generate.append({"id": f"g{i}", "task": "image_generation", "messages": [
            {"role": "user", "content": [{"type": "text", "text": f"Paint something {name}."}]},
            {"role": "assistant", "content": [image]}]})
        text.append({"id": f"t{i}", "text": " ".join(WORDS[(i + k) % 10] for k in range(8))})
    for name, rows in (("understand", understand), ("generate", generate), ("text", text)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    return root


@pytest.fixture(scope="module")
def text_tokenizer(corpus) -> Path:
    texts = [json.loads(line)["text"] for line in (corpus / "text.jsonl").read_text().splitlines()]
    texts += [f"It is {c}. What colour is this? Paint something {c}." for c in COLOURS]
    return train_text_tokenizer(texts * 20, corpus / "tokenizer", vocab_size=320)


def recipe(corpus: Path, tokenizer: Path, out: Path, **sections) -> dict:
    """A tiny LoRA recipe: Llama 2×64, 4 patch tokens per image with a small GMM head."""
    base = {
        "output_dir": str(out),
        "model": {
            "base_config": dict(TINY_LMS["llama"], vocab_size=320),
            "tokenizer": str(tokenizer),
            "media": {"image": {"tokenizer": "patch", "options": {"image_size": 16, "patch_size": 8}}},
            "heads": {"image": {"name": "gmm", "options": {"width": 32, "num_components": 2}}},
        },
        "data": {"root": str(corpus), "train": ["understand.jsonl", "generate.jsonl"], "max_length": 64, "batch_size": 2},
        "policy": {"lm": "lora", "lora": {"r": 4, "dropout": 0.1}},
        "optim": {"lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"warmup_steps": 2},
        "train": {"max_steps": 6, "save_every": 3, "tensorboard": False, "export": "none"},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


def write(tmp_path: Path, data: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return path


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_run(corpus, text_tokenizer, tmp_path_factory) -> Path:
    """One uninterrupted 6-step LoRA run (checkpoints at 3 and 6) that several tests read."""
    tmp = tmp_path_factory.mktemp("lora_run")
    finetune(load_recipe(write(tmp, recipe(corpus, text_tokenizer, tmp / "out", train={"grad_accum": 2}))))
    return tmp / "out"
