"""POPE: object-hallucination yes/no questions, one JSON object per line, one file per sampling setting.

    coco_pope_random.json  coco_pope_popular.json  coco_pope_adversarial.json
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}
    val2014/COCO_val2014_000000310196.jpg

Scored as POPE's own script does: the reply's first sentence is "no" if it
has the word no/No/not, else "yes"; then accuracy, precision, recall, F1
("yes" is positive) and the share of "yes" replies, overall and per setting.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mllm.data.records import BadRecordError, BadRecords
from mllm.eval.loaders.common import collect, field, json_lines, media
from mllm.eval.metrics import pope_metrics, pope_parse
from mllm.eval.tasks import Item, Prediction, Scores, Task


@dataclass
class Options:
    files: str = "*pope_*.json"  # question files in the task's folder; the setting is the name's last word
    images: str = "val2014"  # image folder, relative to the task's folder


def _item(where: str, row: dict, setting: str, images: Path) -> Item:
    qid = field(row, "question_id", where, (int, str))
    label = field(row, "label", where).strip().lower()
    if label not in ("yes", "no"):
        raise BadRecordError("malformed_message", where, f"label must be yes or no, got {row['label']!r}")
    image = media("image", images / field(row, "image", where), where)
    return Item(f"{setting}/{qid}", field(row, "text", where), label, [image], category=setting)


def load(name: str, path: Path, options: Options, bad: BadRecords) -> Task:
    files = [path] if path.is_file() else sorted(path.glob(options.files))
    if not files:
        raise FileNotFoundError(f"{path}: no POPE question files matching {options.files!r}")
    images = (path.parent if path.is_file() else path) / options.images
    items = []
    for file in files:
        setting = file.stem.rsplit("_", 1)[-1]
        items += collect(json_lines(file), lambda where, row: _item(where, row, setting, images), bad)
    return Task(name, items, score, max_new_tokens=16, source=str(path))


def score(items: Sequence[Item], predictions: Sequence[Prediction]) -> Scores:
    parsed = {i.id: pope_parse(p.text or "") for i, p in zip(items, predictions)}
    per_item = {i.id: float(parsed[i.id] == i.answer) for i in items}
    by_setting: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_setting[item.category].append(item)
    metrics = pope_metrics([parsed[i.id] for i in items], [i.answer for i in items]) | {"n": len(items)}
    categories = {s: pope_metrics([parsed[i.id] for i in group], [i.answer for i in group]) | {"n": len(group)}
                  for s, group in sorted(by_setting.items())}
    return Scores(metrics, per_item, categories)
