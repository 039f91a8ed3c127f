"""MMBench: one TSV, a row per question, the image inline as base64.

    index  question  hint  A  B  C  D  answer  category  image  l2-category  split  ...

Scored by CircularEval: each question is asked once per rotation of its
options and counts only if every rotation is answered right. A TSV that
already holds the rotations (rows with index + k·1e6, as the official dev
files do) is used as it is; otherwise the loader makes them (`circular`).
A question with some of its rotations unanswered (cut by a limit, or
skipped as bad) is no CircularEval question: it is left out of
`circular_accuracy` and counted in `incomplete_questions`.
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
from collections import Counter, defaultdict
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


def _index(row: dict) -> int:
    return int(float(row["index"]))  # ValueError, or OverflowError for inf


def _rotations_held(rows: list[tuple[str, dict]]) -> Counter[int]:
    """Rows of each question (index mod the stride) in the TSV, bad ones too: the rotations it holds of each."""
    held: Counter[int] = Counter()
    for _, row in rows:
        try:
            held[_index(row) % CIRCULAR_STRIDE] += 1
        except (KeyError, TypeError, ValueError, OverflowError):
            pass  # a row _items refuses
    return held


def _items(where: str, row: dict, rows_by_index: dict[str, dict], out: Path, tsv: Path, rotate: bool,
           held: Counter[int]) -> list[Item]:
    for key in ("index", "question", "answer"):
        if not _present(row.get(key)):
            raise BadRecordError("malformed_message", where, f"missing column {key!r}")
    try:
        index = _index(row)
    except (ValueError, OverflowError) as e:
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
    shifts = range(len(choices)) if rotate else [0]
    group = index % CIRCULAR_STRIDE
    meta = {"group": group, "rotations": len(shifts) if rotate else held[group], "l2_category": row.get("l2-category") or None}
    answer = LETTERS.index(row["answer"])
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
    held = _rotations_held(rows)
    groups = collect(rows, lambda where, row: _items(where, row, by_index, out, path, rotate, held), bad)
    return Task(name, [item for group in groups for item in group], score, max_new_tokens=8, source=str(path))


def predicted_letter(item: Item, prediction: Prediction) -> str | None:
    """The option the model chose: by likelihood if it was scored so, else parsed from its reply."""
    if prediction.choice is not None:
        return LETTERS[prediction.choice]
    return choice_letter(prediction.text or "", dict(zip(LETTERS, item.choices or [])))


def score(items: Sequence[Item], predictions: Sequence[Prediction]) -> Scores:
    per_item = {i.id: float(predicted_letter(i, p) == i.answer) for i, p in zip(items, predictions)}
    groups: dict[int, list[bool]] = defaultdict(list)
    rotations: dict[int, int] = {}
    categories: dict[str, set[int]] = defaultdict(set)
    for item in items:
        groups[item.meta["group"]].append(per_item[item.id] == 1.0)
        rotations[item.meta["group"]] = item.meta["rotations"]
        categories[item.category or "uncategorized"].add(item.meta["group"])
    first = [per_item[i.id] for i in items if int(i.id) < CIRCULAR_STRIDE]  # the questions as written
    accuracy = sum(first) / len(first) if first else "skipped: no question answered in its first rotation"
    metrics = _circular(groups, rotations) | {"accuracy": accuracy, "n": len(items)}
    return Scores(metrics, per_item, {c: _circular({g: groups[g] for g in sorted(gs)}, rotations)
                                      for c, gs in sorted(categories.items())})


def _circular(groups: dict[int, list[bool]], rotations: dict[int, int]) -> dict[str, float | int | str]:
    """CircularEval over the questions with every rotation answered; the others are only counted: a question
    asked in fewer rotations has had fewer chances to fail, so scoring it would flatter the model."""
    complete = {g: passes for g, passes in groups.items() if len(passes) == rotations[g]}
    metrics = {"circular_accuracy": circular_accuracy(complete) if complete else
               "skipped: no question has all its rotations answered", "questions": len(complete)}
    if len(complete) < len(groups):
        metrics["incomplete_questions"] = len(groups) - len(complete)
    return metrics
