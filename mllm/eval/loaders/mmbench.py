"""MMBench: one TSV, a row per question, the image inline as base64.

    index  question  hint  A  B  C  D  answer  category  image  l2-category  split  ...

Scored by CircularEval: each question is asked once per rotation of its
options and counts only if every rotation is answered right. A TSV that
already holds the rotations (rows with index + k·1e6, as the official dev
files do) is used as it is; otherwise the loader makes them (`circular`).
Free-form replies are matched to a letter by MMBench's rules, without its GPT
fallback. Images are decoded once into the mllm cache.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from mllm.data.records import BadRecordError, BadRecords
from mllm.data.sources import cache_dir
from mllm.eval.loaders.common import collect, media
from mllm.eval.metrics import LETTERS, choice_letter, circular_accuracy, rotate_choices
from mllm.eval.tasks import Item, Prediction, Scores, Task

CIRCULAR_STRIDE = 1_000_000
PROMPT = "Answer with the option's letter from the given choices directly."


@dataclass
class Options:
    circular: bool = True  # make the rotations of each question when the TSV has none
    images: str | None = None  # folder for the decoded images; default: $MLLM_CACHE/eval/mmbench/<tsv hash>


def _present(value: str | None) -> bool:
    return value is not None and value.strip() not in ("", "nan", "NaN", "None")


def _image_file(row: dict, rows_by_index: dict[str, dict], out: Path, tsv: Path, where: str) -> Path:
    """The row's image: `image_path` relative to the TSV, or its base64 `image` (or another row's, when
    the cell holds that row's index) decoded to a PNG under `out`."""
    if _present(row.get("image_path")):
        return tsv.parent / row["image_path"]
    data = row.get("image") or ""
    if data in rows_by_index and data != row["index"]:
        return _image_file(rows_by_index[data], rows_by_index, out, tsv, where)
    target = out / f"{hashlib.sha256(data.encode()).hexdigest()[:24]}.png"
    if not target.is_file():
        try:
            image = PIL.Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
            image.load()
        except (binascii.Error, ValueError, OSError) as e:
            raise BadRecordError("corrupt_media", where, f"'image' is not a base64 image: {e}") from e
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        image.convert("RGB").save(tmp, format="PNG")
        os.replace(tmp, target)
    return target


def _prompt(row: dict, choices: list[str]) -> str:
    lines = [row["hint"]] if _present(row.get("hint")) else []
    lines.append(row["question"])
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    lines.append(PROMPT)
    return "\n".join(lines)


def _items(where: str, row: dict, rows_by_index: dict[str, dict], out: Path, tsv: Path, rotate: bool) -> list[Item]:
    for key in ("index", "question", "answer"):
        if not _present(row.get(key)):
            raise BadRecordError("malformed_message", where, f"missing column {key!r}")
    try:
        index = int(float(row["index"]))
    except ValueError as e:
        raise BadRecordError("malformed_message", where, f"index {row['index']!r} is not a number") from e
    choices = []
    for letter in LETTERS:
        if not _present(row.get(letter)):
            break
        choices.append(row[letter])
    if len(choices) < 2 or row["answer"] not in LETTERS[: len(choices)]:
        raise BadRecordError("malformed_message", where, f"needs options A, B, ... and an answer among them, got {row['answer']!r}")
    image = media("image", _image_file(row, rows_by_index, out, tsv, where), where)
    category = row.get("category") or None
    meta = {"group": index % CIRCULAR_STRIDE, "l2_category": row.get("l2-category") or None}
    answer = LETTERS.index(row["answer"])
    shifts = range(len(choices)) if rotate else [0]
    items = []
    for shift in shifts:
        options, right = rotate_choices(choices, answer, shift)
        items.append(Item(str(index + shift * CIRCULAR_STRIDE), _prompt(row, options), LETTERS[right], [image],
                          options, category, meta))
    return items


def load(name: str, path: Path, options: Options, bad: BadRecords) -> Task:
    if path.is_dir():
        raise IsADirectoryError(f"{path}: point an MMBench task at its .tsv file, not a folder")
    csv.field_size_limit(sys.maxsize)  # base64 images are long cells
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(f"{path}:{n}", row) for n, row in enumerate(csv.DictReader(f, delimiter="\t"), 2)]
    if not rows:
        raise ValueError(f"{path}: an empty MMBench TSV")
    if "answer" not in rows[0][1]:
        raise ValueError(f"{path}: no 'answer' column (a test split is scored by the MMBench server, not here)")
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(options.images) if options.images else cache_dir() / "eval" / "mmbench" / key
    out.mkdir(parents=True, exist_ok=True)
    by_index = {row.get("index", ""): row for _, row in rows}
    has_rotations = any(_present(i) and float(i) >= CIRCULAR_STRIDE for i in by_index)
    rotate = options.circular and not has_rotations
    groups = collect(rows, lambda where, row: _items(where, row, by_index, out, path, rotate), bad)
    return Task(name, [item for group in groups for item in group], score, max_new_tokens=8, source=str(path))


def predicted_letter(item: Item, prediction: Prediction) -> str | None:
    """The option the model chose: by likelihood if it was scored so, else parsed from its reply."""
    if prediction.choice is not None:
        return LETTERS[prediction.choice]
    return choice_letter(prediction.text or "", dict(zip(LETTERS, item.choices or [])))


def score(items: Sequence[Item], predictions: Sequence[Prediction]) -> Scores:
    per_item = {i.id: float(predicted_letter(i, p) == i.answer) for i, p in zip(items, predictions)}
    groups: dict[int, list[bool]] = defaultdict(list)
    category_groups: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        groups[item.meta["group"]].append(per_item[item.id] == 1.0)
        category_groups[item.category or "uncategorized"][item.meta["group"]].append(per_item[item.id] == 1.0)
    first = [per_item[i.id] for i in items if int(i.id) < CIRCULAR_STRIDE]
    metrics = {"circular_accuracy": circular_accuracy(groups), "accuracy": sum(first) / len(first), "questions": len(groups),
               "n": len(items)}
    categories = {c: {"circular_accuracy": circular_accuracy(g), "questions": len(g)} for c, g in sorted(category_groups.items())}
    return Scores(metrics, per_item, categories)
