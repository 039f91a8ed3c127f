"""MSVD-QA and MSRVTT-QA: open-ended questions about short clips, as their authors released them.

    test_qa.json   [{"id": 0, "video_id": 7010, "question": "what is a man doing?", "answer": "sing"}]
    video/video7010.mp4                                  (MSRVTT-QA: `videos: video/video{video_id}.mp4`)
    youtube_mapping.txt + YouTubeClips/<name>.avi        (MSVD-QA: `mapping: youtube_mapping.txt`,
                                                          `videos: YouTubeClips/{name}.avi`; lines "<name> vid<id>")

Scored by normalised exact match, overall and per question word (what, who,
how, when, where). `judge: "package.module:function"` names an optional
callable (question, answer, prediction) -> score in [0, 1], e.g. an LLM
judge, reported beside it as judge_score.
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mllm.data.records import BadRecordError, BadRecords
from mllm.eval.loaders.common import collect, field, media, read_json
from mllm.eval.metrics import exact_match
from mllm.eval.tasks import Item, Prediction, Scores, Task

Judge = Callable[[str, str, str], float]


@dataclass
class Options:
    questions: str = "test_qa.json"
    videos: str = "video/video{video_id}.mp4"  # formatted with video_id (and name, with a mapping)
    mapping: str | None = None  # MSVD's youtube_mapping.txt: "<name> vid<video_id>" per line
    judge: str | None = None  # "package.module:function", called as function(question, answer, prediction)


def _mapping(file: Path) -> dict[int, str]:
    names = {}
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("vid") or not parts[1][3:].isdigit():
            raise ValueError(f"{file}:{n}: expected '<youtube name> vid<number>', got {line!r}")
        names[int(parts[1][3:])] = parts[0]
    return names


def load_judge(target: str) -> Judge:
    module, sep, name = target.partition(":")
    if not sep:
        raise ValueError(f"judge must look like 'package.module:function', got {target!r}")
    judge = getattr(importlib.import_module(module), name, None)
    if not callable(judge):
        raise ValueError(f"judge {target!r}: {module} has no function {name!r}")
    return judge


def load(name: str, path: Path, options: Options, bad: BadRecords) -> Task:
    file = path / options.questions
    data = read_json(file)
    if not isinstance(data, list):
        raise ValueError(f"{file}: expected a list of questions")
    names = _mapping(path / options.mapping) if options.mapping else {}
    judge = load_judge(options.judge) if options.judge else None

    def build(where: str, row: dict) -> Item:
        video_id = field(row, "video_id", where, (int, str))
        if names and int(video_id) not in names:
            raise BadRecordError("missing_media", where, f"video {video_id} is not in {options.mapping}")
        video = media("video", path / options.videos.format(video_id=video_id, name=names.get(int(video_id), "")), where)
        question = field(row, "question", where)
        words = question.split()
        return Item(str(row.get("id", where)), question, str(field(row, "answer", where, (str, int))), [video],
                    category=words[0].lower() if words else None)

    rows = [(f"{file}[{n}]", row) for n, row in enumerate(data)]
    return Task(name, collect(rows, build, bad), scorer(judge), max_new_tokens=16, source=str(file))


def scorer(judge: Judge | None):
    def score(items: Sequence[Item], predictions: Sequence[Prediction]) -> Scores:
        per_item = {i.id: float(exact_match(p.text or "", i.answer)) for i, p in zip(items, predictions)}
        by_word: dict[str, list[float]] = defaultdict(list)
        for item in items:
            by_word[item.category or "other"].append(per_item[item.id])
        metrics = {"accuracy": sum(per_item.values()) / len(per_item), "n": len(items)}
        if judge is not None:
            judged = [float(judge(i.question, i.answer, p.text or "")) for i, p in zip(items, predictions)]
            metrics["judge_score"] = sum(judged) / len(judged)
        categories = {w: {"accuracy": sum(v) / len(v), "n": len(v)} for w, v in sorted(by_word.items())}
        return Scores(metrics, per_item, categories)

    return score
