"""An independent digit classifier that judges decoded images (and video frames).

A small CNN trained only on the original images of the digits corpus' train
split, never on any model's output, so "the judge reads the digit" is a fair
test of a reconstruction or a generation. Inputs are any-size RGB images:
they are resized to 32² and averaged to grey.

    judge = DigitJudge.load_or_train(corpora_dir)
    judge.predict(images)            # -> [7, 2, ...]
    judge.info["accuracy"]           # on the original validation and test images

Trained once per training set and cached under `$MLLM_CACHE/judges/`
(default `~/.cache/mllm/judges/`), in a directory named by a fingerprint of
the training images, their labels and the training recipe: weights
(`model.safetensors`) and `judge.json` (fingerprint, data, accuracy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from mllm.media import Image, MediaError, load_image

IMAGE_SIZE = 32


@dataclass(frozen=True)
class JudgeRecipe:
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


def cache_root() -> Path:
    return Path(os.environ.get("MLLM_CACHE") or Path.home() / ".cache" / "mllm") / "judges"


def digit_images(corpora_dir: str | os.PathLike, split: str) -> tuple[list[Path], list[int]]:
    """The distinct images of the digits corpus' `split` and their labels, in record order."""
    records = Path(corpora_dir) / "digits" / f"{split}.jsonl"
    if not records.is_file():
        raise FileNotFoundError(f"{records}: no digits corpus here (build it with `mllm data build`)")
    labels: dict[Path, int] = {}
    for line in records.read_text().splitlines():
        record = json.loads(line)
        for message in record["messages"]:
            for part in message["content"]:
                if part.get("type") == "image":
                    labels.setdefault(records.parent / part["path"], int(record["meta"]["label"]))
    if not labels:
        raise ValueError(f"{records}: no images")
    return list(labels), list(labels.values())


def fingerprint(paths: list[Path], labels: list[int], recipe: JudgeRecipe) -> str:
    """sha256 over the recipe, and every training image's bytes and label, in order."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode())
    for path, label in zip(paths, labels):
        h.update(hashlib.sha256(path.read_bytes()).digest() + label.to_bytes(1, "big"))
    return h.hexdigest()


class DigitJudge(nn.Module):
    """A LeNet-style CNN: grey [B, 1, 32, 32] in [0, 1] -> logits [B, 10]."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, 32, 16, 16]
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, 64, 8, 8]
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
        )
        self.info: dict = {}

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        return self.net(grey)

    @staticmethod
    def to_input(images: list[Image]) -> torch.Tensor:
        """Images -> grey [B, 1, 32, 32] in [0, 1]."""
        for i, image in enumerate(images):
            if not isinstance(image, Image):
                raise MediaError("<digit judge>", f"item {i}: expected an Image, got {type(image).__name__}")
        return torch.stack([image.resize(IMAGE_SIZE).to_tensor().mean(0, keepdim=True) for image in images])

    @torch.no_grad()
    def predict(self, images: list[Image], batch_size: int = 256) -> list[int]:
        """The digit each image shows."""
        self.eval()
        out: list[int] = []
        for i in range(0, len(images), batch_size):
            out += self(self.to_input(images[i:i + batch_size])).argmax(dim=1).tolist()
        return out

    def accuracy(self, images: list[Image], labels: list[int]) -> float:
        if len(images) != len(labels) or not images:
            raise ValueError(f"need as many labels as images (at least one), got {len(labels)} and {len(images)}")
        return sum(p == y for p, y in zip(self.predict(images), labels)) / len(labels)

    @classmethod
    def load_or_train(
        cls, corpora_dir: str | os.PathLike, recipe: JudgeRecipe = JudgeRecipe(), progress: bool = True
    ) -> DigitJudge:
        """The cached judge for this corpus' train split, trained first if there is none."""
        paths, labels = digit_images(corpora_dir, "train")
        key = fingerprint(paths, labels, recipe)
        cached = cache_root() / f"digits-{key[:16]}"
        if (cached / "judge.json").is_file():
            judge = cls()
            judge.load_state_dict(load_file(cached / "model.safetensors"))
            judge.info = json.loads((cached / "judge.json").read_text())
            return judge.eval()
        judge = cls.train_on([load_image(p) for p in paths], labels, recipe, progress)
        judge.info = {"fingerprint": key, "train_images": len(paths), "recipe": dataclasses.asdict(recipe), "accuracy": {}}
        for split in ("validation", "test"):
            split_paths, split_labels = digit_images(corpora_dir, split)
            judge.info["accuracy"][split] = judge.accuracy([load_image(p) for p in split_paths], split_labels)
        judge.save(cached)
        return judge

    @classmethod
    def train_on(cls, images: list[Image], labels: list[int], recipe: JudgeRecipe, progress: bool = True) -> DigitJudge:
        """Adam on cross-entropy, shuffled mini-batches, seeded."""
        torch.manual_seed(recipe.seed)
        judge = cls()
        x, y = cls.to_input(images), torch.tensor(labels)
        optimizer = torch.optim.Adam(judge.parameters(), lr=recipe.lr)
        order = torch.Generator().manual_seed(recipe.seed)
        judge.train()
        steps = [(e, i) for e in range(recipe.epochs) for i in range(0, len(x), recipe.batch_size)]
        perm = None
        for epoch, i in tqdm(steps, desc="digit judge", disable=not progress):
            if i == 0:
                perm = torch.randperm(len(x), generator=order)
            batch = perm[i:i + recipe.batch_size]
            loss = F.cross_entropy(judge(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return judge.eval()

    def save(self, path: Path) -> Path:
        """Write weights and judge.json into a temporary directory, then move it into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "judge.json").write_text(json.dumps(self.info, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path
