"""The generic JSONL task, for your own data: one item per line, media paths relative to the file.

    comprehension  {"id": "q1", "media": [{"type": "image", "path": "img/1.png"}], "question": "What digit?",
                    "answer": "7", "choices": ["1", "7"] (optional), "category": "digits" (optional)}
    generation     {"id": "g1", "prompt": "Write a seven.", "target": "7"}     with `generate: image|audio|video`

Comprehension is scored by normalised exact match; with choices, also by the
likelihood of each choice (the answer is the right choice's text or letter).
Generation writes one file per item (listed in predictions.jsonl, for any
external judge); `judge` scores them here: "digits" (digit images, or video
frames read per digit lane by majority), "moving_digits" (video: its digits and
the way they move, "7 up"), "spoken_digits" (audio), or "package.module:function"
taking the files' paths and returning a label for each, compared with `target`.
The built-in judges are independent classifiers trained only on the real
corpora (`judge_data`), never on a model's output.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mllm.data.records import BadRecordError, BadRecords
from mllm.eval.loaders.common import collect, field, json_lines, media
from mllm.eval.loaders.videoqa import load_judge
from mllm.eval.metrics import LETTERS, choice_letter, exact_match, normalize_answer
from mllm.eval.tasks import Item, Modality, Prediction, Scores, Task

FileJudge = Callable[[list[str]], list[str]]  # generated files -> the label each shows
BUILTIN_JUDGES = {"digits": ("image", "video"), "moving_digits": ("video",), "spoken_digits": ("audio",)}


@dataclass
class Options:
    generate: Modality | None = None  # a generation task: what the model writes for each prompt
    judge: str | None = None  # digits | moving_digits | spoken_digits | package.module:function (generation only)
    judge_data: str | None = None  # built corpora the built-in judges train on; default $MLLM_CACHE/corpora

    def __post_init__(self):
        if self.judge and not self.generate:
            raise ValueError("a judge scores generated files: set 'generate' too")
        if self.judge in BUILTIN_JUDGES and self.generate not in BUILTIN_JUDGES[self.judge]:
            raise ValueError(f"judge {self.judge!r} reads {' or '.join(BUILTIN_JUDGES[self.judge])}, not {self.generate}")


def _comprehension(where: str, row: dict, base: Path) -> Item:
    refs = []
    for k, m in enumerate(field(row, "media", where, list) if "media" in row else []):
        kind, rel = field(m, "type", f"{where}: media[{k}]"), field(m, "path", f"{where}: media[{k}]")
        if kind not in ("image", "audio", "video"):
            raise BadRecordError("malformed_message", where, f"media[{k}]: type must be image, audio or video, got {kind!r}")
        refs.append(media(kind, base / rel, where))
    choices = field(row, "choices", where, list) if row.get("choices") is not None else None
    answer = str(field(row, "answer", where, (str, int)))
    if choices is not None:
        choices = [str(c) for c in choices]
        if answer not in LETTERS[: len(choices)] and not any(exact_match(c, answer) for c in choices):
            raise BadRecordError("malformed_message", where, f"answer {answer!r} is none of the choices")
    return Item(str(field(row, "id", where, (str, int))), field(row, "question", where), answer, refs, choices,
                row.get("category"))


def _generation(where: str, row: dict) -> Item:
    return Item(str(field(row, "id", where, (str, int))), field(row, "prompt", where),
                str(field(row, "target", where, (str, int))), category=row.get("category"))


def load(name: str, path: Path, options: Options, bad: BadRecords) -> Task:
    if options.generate:
        items = collect(json_lines(path), _generation, bad)
        judge = (lambda: _judge(options)) if options.judge else None  # built when scoring: it may train first
        return Task(name, items, generation_scorer(judge, options.judge), mode="media", modality=options.generate,
                    source=str(path))
    items = collect(json_lines(path), lambda where, row: _comprehension(where, row, path.parent), bad)
    with_choices = bool(items) and all(i.choices for i in items)
    return Task(name, items, score, mode="both" if with_choices else "generate", source=str(path))


def right_choice(item: Item) -> int:
    """The index of the right option: the answer is its letter or its text."""
    choices = item.choices or []
    if item.answer in LETTERS[: len(choices)]:
        return LETTERS.index(item.answer)
    return next(k for k, c in enumerate(choices) if exact_match(c, item.answer))


def _correct(item: Item, prediction: Prediction) -> bool:
    if prediction.choice is not None:
        return prediction.choice == right_choice(item)
    text = prediction.text or ""
    if exact_match(text, item.answer):
        return True
    if item.choices:
        letter = choice_letter(text, dict(zip(LETTERS, item.choices)))
        return letter is not None and LETTERS.index(letter) == right_choice(item)
    return False


def score(items: Sequence[Item], predictions: Sequence[Prediction]) -> Scores:
    per_item = {i.id: float(_correct(i, p)) for i, p in zip(items, predictions)}
    return Scores({"accuracy": sum(per_item.values()) / len(per_item), "n": len(items)}, per_item, _categories(items, per_item))


def _categories(items: Sequence[Item], per_item: dict[str, float]) -> dict[str, dict]:
    groups: dict[str, list[float]] = defaultdict(list)
    for item in items:
        if item.category:
            groups[str(item.category)].append(per_item[item.id])
    return {c: {"accuracy": sum(v) / len(v), "n": len(v)} for c, v in sorted(groups.items())}


# ---- generation ---------------------------------------------------------------------------------------------


def generation_scorer(make_judge: Callable[[], FileJudge] | None, judge_name: str | None):
    def score(items: Sequence[Item], predictions: Sequence[Prediction]) -> Scores:
        if make_judge is None:
            metrics = {"n": len(items), "files": sum(len(p.files) for p in predictions),
                       "judge": "none: score the files listed in predictions.jsonl with your own judge"}
            return Scores(metrics, {})
        made = [p.files[0] for p in predictions if p.files]  # an item whose medium was not finished: no file
        judged = iter(make_judge()(made) if made else [])
        labels = [next(judged) if p.files else "" for p in predictions]
        per_item = {i.id: float(normalize_answer(label) == normalize_answer(i.answer)) for i, label in zip(items, labels)}
        metrics = {"judge_accuracy": sum(per_item.values()) / len(per_item), "n": len(items), "judge": judge_name}
        return Scores(metrics, per_item, _categories(items, per_item), {i.id: label for i, label in zip(items, labels)})

    return score


def _judge(options: Options) -> FileJudge:
    if options.judge not in BUILTIN_JUDGES:
        return load_judge(options.judge)
    from mllm.data.sources import cache_dir

    corpora = Path(options.judge_data) if options.judge_data else cache_dir() / "corpora"
    if options.judge == "spoken_digits":
        return spoken_digit_judge(corpora)
    return digit_judge(corpora, options.generate, motion=options.judge == "moving_digits")


def _each_file(read: Callable[[str], str]) -> FileJudge:
    """A judge of one file made a judge of a list of files; "" for a missing file."""
    return lambda paths: [read(p) if p and os.path.isfile(p) else "" for p in paths]


def digit_judge(corpora: Path, modality: Modality, motion: bool = False) -> FileJudge:
    """Digit images -> "0".."9"; a video -> its digits, space-separated, each its lane's frame majority
    (`VideoJudge`), and with `motion` the way they move by their centroid track ("7 up")."""
    from mllm.judges.digits import DigitJudge
    from mllm.judges.video import VideoJudge, direction
    from mllm.media import load_image, load_video

    judge = DigitJudge.load_or_train(corpora)
    if modality == "image":
        return _each_file(lambda path: str(judge.predict([load_image(path)])[0]))

    lanes = VideoJudge(judge)

    def read(path: str) -> str:
        video = load_video(path)
        return " ".join([*map(str, lanes.digits(video)), *([direction(video)] if motion else [])])

    return _each_file(read)


def spoken_digit_judge(corpora: Path) -> FileJudge:
    """Spoken digits -> "0".."9"; "" for a missing file."""
    from mllm.judges.spoken_digits import SpokenDigitJudge
    from mllm.media import load_audio

    judge = SpokenDigitJudge.load_or_train(corpora)
    return _each_file(lambda path: str(judge.predict([load_audio(path)])[0]))
