"""VQAv2: the official questions and annotations JSON files and the COCO images.

    v2_OpenEnded_mscoco_val2014_questions.json  {"questions": [{"question_id", "image_id", "question"}]}
    v2_mscoco_val2014_annotations.json          {"annotations": [{"question_id", "answer_type", "question_type",
                                                                  "answers": [{"answer": ...} x 10]}]}
    val2014/COCO_val2014_000000262148.jpg

Scored by VQA accuracy: the reply and the ten answers are normalised the
official way, and the reply scores min(1, matches among the other nine / 3),
averaged over the ten; overall and per answer type (yes/no, number, other).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mllm.data.records import BadRecordError, BadRecords
from mllm.eval.loaders.common import collect, field, media, read_json
from mllm.eval.metrics import vqa_accuracy
from mllm.eval.tasks import Item, Prediction, Scores, Task


@dataclass
class Options:
    questions: str = "v2_OpenEnded_mscoco_val2014_questions.json"
    annotations: str = "v2_mscoco_val2014_annotations.json"
    images: str = "val2014/COCO_val2014_{image_id:012d}.jpg"  # formatted with the question's image_id
    prompt: str = "\nAnswer the question using a single word or phrase."  # appended to each question (as lmms-eval)


def _list(data: object, key: str, file: Path) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{file}: expected an object with a {key!r} list")
    return data[key]


def load(name: str, path: Path, options: Options, bad: BadRecords) -> Task:
    qfile, afile = path / options.questions, path / options.annotations
    questions = _list(read_json(qfile), "questions", qfile)
    annotations = {a.get("question_id"): a for a in _list(read_json(afile), "annotations", afile) if isinstance(a, dict)}

    def build(where: str, q: dict) -> Item:
        qid = field(q, "question_id", where, (int, str))
        ann = annotations.get(qid)
        if ann is None:
            raise BadRecordError("malformed_message", where, f"question {qid} has no annotation in {afile.name}")
        answers = [a.get("answer") for a in field(ann, "answers", f"{afile}: question {qid}", list) if isinstance(a, dict)]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise BadRecordError("malformed_message", where, f"question {qid}: its annotation has no string answers")
        image_id = field(q, "image_id", where, (int, str))
        try:
            image_path = path / options.images.format(image_id=int(image_id))
        except ValueError as e:
            raise BadRecordError("malformed_message", where, f"image_id {image_id!r} is not a number") from e
        image = media("image", image_path, where)
        return Item(str(qid), field(q, "question", where) + options.prompt, answers, [image],
                    category=ann.get("answer_type"), meta={"question_type": ann.get("question_type")})

    rows = [(f"{qfile}:questions[{n}]", q) for n, q in enumerate(questions)]
    return Task(name, collect(rows, build, bad), score, max_new_tokens=16, source=str(path))


def score(items: Sequence[Item], predictions: Sequence[Prediction]) -> Scores:
    per_item = {i.id: vqa_accuracy(p.text or "", i.answer) for i, p in zip(items, predictions)}
    by_type: dict[str, list[float]] = defaultdict(list)
    for item in items:
        by_type[item.category or "unknown"].append(per_item[item.id])
    categories = {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(by_type.items())}
    return Scores({"accuracy": sum(per_item.values()) / len(per_item), "n": len(items)}, per_item, categories)
