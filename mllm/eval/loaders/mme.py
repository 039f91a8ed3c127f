"""MME: a folder per subtask, each image with a .txt of two yes/no questions ("question<TAB>Yes").

    MME_Benchmark_release_version/
      existence/000000006040.jpg  existence/000000006040.txt          (image and questions side by side)
      artwork/images/10002.jpg    artwork/questions_answers_YN/10002.txt

Scored as MME's own tool does: replies parsed to yes/no/other, then per
subtask acc (per question), acc+ (per image, both right) and
score = acc + acc+ in percent, summed over the perception and cognition subtasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mllm.data.records import BadRecordError, BadRecords
from mllm.eval.loaders.common import collect, media
from mllm.eval.metrics import mme_parse, mme_scores
from mllm.eval.tasks import Item, Prediction, Scores, Task

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


@dataclass
class Options:
    subtasks: list[str] | None = None  # only these subtask folders; default: every one (but eval_tool/)


def _question_files(root: Path, subtask: Path) -> list[tuple[Path, Path]]:
    """(questions .txt, folder its image is in) for one subtask folder, in either layout."""
    nested = subtask / "questions_answers_YN"
    if nested.is_dir():
        return [(txt, subtask / "images") for txt in sorted(nested.glob("*.txt"))]
    return [(txt, subtask) for txt in sorted(subtask.glob("*.txt"))]


def _items(subtask: str, txt: Path, image_dir: Path) -> list[Item]:
    image = next((image_dir / (txt.stem + s) for s in IMAGE_SUFFIXES if (image_dir / (txt.stem + s)).is_file()), None)
    if image is None:
        raise BadRecordError("missing_media", str(txt), f"no image {txt.stem}{{{','.join(IMAGE_SUFFIXES)}}} in {image_dir}")
    ref = media("image", image, str(txt))
    items = []
    for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        question, sep, answer = line.rpartition("\t")
        if not sep or answer.strip().lower() not in ("yes", "no"):
            raise BadRecordError("malformed_message", f"{txt}:{n}", "expected 'question<TAB>Yes' or 'question<TAB>No'")
        items.append(Item(f"{subtask}/{txt.stem}/{n}", question.strip(), answer.strip(), [ref], category=subtask,
                          meta={"image": txt.stem}))
    return items


def load(name: str, path: Path, options: Options, bad: BadRecords) -> Task:
    folders = sorted(p for p in path.iterdir() if p.is_dir() and p.name != "eval_tool")
    if options.subtasks is not None:
        missing = sorted(set(options.subtasks) - {p.name for p in folders})
        if missing:
            raise FileNotFoundError(f"{path}: no MME subtask folder {missing[0]}")
        folders = [p for p in folders if p.name in options.subtasks]
    rows = [(str(txt), (folder.name, txt, image_dir)) for folder in folders for txt, image_dir in _question_files(path, folder)]
    if not rows:
        raise FileNotFoundError(f"{path}: no MME question files (<subtask>/*.txt or <subtask>/questions_answers_YN/*.txt)")
    groups = collect(rows, lambda where, row: _items(*row), bad)
    return Task(name, [item for group in groups for item in group], score, max_new_tokens=16, source=str(path))


def score(items: Sequence[Item], predictions: Sequence[Prediction]) -> Scores:
    per_item = {i.id: float(mme_parse(p.text or "") == i.answer.lower()) for i, p in zip(items, predictions)}
    by_subtask = mme_scores((i.category, i.meta["image"], per_item[i.id] == 1.0) for i in items)
    categories = {k: v for k, v in by_subtask.items() if k not in ("perception", "cognition")}
    metrics = {"accuracy": sum(per_item.values()) / len(per_item), "n": len(items)}
    metrics |= {f"{group}_score": by_subtask[group]["score"] for group in ("perception", "cognition") if group in by_subtask}
    return Scores(metrics, per_item, categories)
