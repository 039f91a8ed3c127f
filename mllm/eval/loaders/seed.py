"""SEED-Bench: one JSON of four-option questions over images and video clips.

    SEED-Bench.json   {"question_type": {"Scene Understanding": 1, ...},
                       "questions": [{"question_id": "101669", "question": ..., "choice_a": ... "choice_d": ...,
                                      "answer": "A", "data_type": "image" | "video", "data_id": "1454426_2591111986",
                                      "question_type_id": 5, "segment": [start_s, end_s] (some videos)}]}
    SEED-Bench-image/<data_id>
    SEED-Bench-video/<data_id>        (a video file or a folder of its frames)

Scored both ways SEED-Bench is reported: by generation (the reply's option
letter) and by likelihood (the most likely option text, SEED-Bench's own
protocol); accuracy overall, per data type and per evaluation dimension.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mllm.data.records import BadRecordError, BadRecords
from mllm.eval.loaders.common import collect, field as required, media, read_json
from mllm.eval.loaders.mmbench import PROMPT, predicted_letter
from mllm.eval.metrics import LETTERS
from mllm.eval.tasks import Item, Prediction, Scores, Task

CHOICE_KEYS = ("choice_a", "choice_b", "choice_c", "choice_d")


@dataclass
class Options:
    questions: str = "SEED-Bench.json"  # relative to the task's path (a folder)
    image_dir: str = "SEED-Bench-image"
    video_dir: str = "SEED-Bench-video"
    video_dirs: dict[str, str] = field(default_factory=dict)  # question_type_id -> its own video folder
    data_types: list[str] = field(default_factory=lambda: ["image", "video"])


def _item(where: str, q: dict, root: Path, options: Options, dimensions: dict[int, str]) -> Item:
    qid = str(required(q, "question_id", where, (str, int)))
    where = f"{where} (question_id {qid})"
    data_type = required(q, "data_type", where)
    data_id = required(q, "data_id", where)
    kind = required(q, "question_type_id", where, int)
    answer = required(q, "answer", where)
    choices = [required(q, k, where) for k in CHOICE_KEYS]
    if answer not in LETTERS[:4]:
        raise BadRecordError("malformed_message", where, f"answer must be A, B, C or D, got {answer!r}")
    if data_type == "image":
        ref = media("image", root / options.image_dir / data_id, where)
    elif data_type == "video":
        segment = q.get("segment")
        if segment is not None:
            try:
                start, end = (float(s) for s in segment if not isinstance(s, bool))
            except (TypeError, ValueError):  # not a pair, or not numbers
                raise BadRecordError("malformed_message", where, f"segment must be [start, end] in seconds, got "
                                     f"{segment!r}") from None
            segment = (start, end)
        folder = options.video_dirs.get(str(kind), options.video_dir)
        ref = media("video", root / folder / data_id, where, segment)
    else:
        raise BadRecordError("malformed_message", where, f"data_type must be 'image' or 'video', got {data_type!r}")
    text = "\n".join([required(q, "question", where)] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)] + [PROMPT])
    return Item(qid, text, answer, [ref], choices, dimensions.get(kind, str(kind)), {"data_type": data_type})


def load(name: str, path: Path, options: Options, bad: BadRecords) -> Task:
    data = read_json(path / options.questions)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ValueError(f"{path / options.questions}: expected an object with a 'questions' list")
    dimensions = {int(v): k for k, v in (data.get("question_type") or {}).items()}
    file = path / options.questions
    unwanted = {"image", "video"} - set(options.data_types)
    rows = [(f"{file}:questions[{n}]", q) for n, q in enumerate(data["questions"])
            if not (isinstance(q, dict) and q.get("data_type") in unwanted)]
    items = collect(rows, lambda where, q: _item(where, q, path, options, dimensions), bad)
    return Task(name, items, score, mode="both", max_new_tokens=8, source=str(file))


def score(items: Sequence[Item], predictions: Sequence[Prediction]) -> Scores:
    per_item = {i.id: float(predicted_letter(i, p) == i.answer) for i, p in zip(items, predictions)}
    groups: dict[str, dict[str, list[float]]] = {"data_type": defaultdict(list), "dimension": defaultdict(list)}
    for item in items:
        groups["data_type"][item.meta["data_type"]].append(per_item[item.id])
        groups["dimension"][item.category].append(per_item[item.id])
    metrics = {"accuracy": sum(per_item.values()) / len(per_item), "n": len(items)}
    metrics |= {f"{t}_accuracy": sum(v) / len(v) for t, v in sorted(groups["data_type"].items())}
    categories = {c: {"accuracy": sum(v) / len(v), "n": len(v)} for c, v in sorted(groups["dimension"].items())}
    return Scores(metrics, per_item, categories)
