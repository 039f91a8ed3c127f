"""Audio captioning, Clotho and AudioCaps: a CSV of reference captions beside the audio files.

    Clotho     clotho_captions_evaluation.csv   file_name,caption_1,...,caption_5
               evaluation/<file_name>
    AudioCaps  test.csv                         audiocap_id,youtube_id,start_time,caption   (one row per caption)
               `audio: "{youtube_id}.wav"`       (however the clips were saved; any column can be used)

Rows naming the same audio file are one item whose references are every
non-empty caption* cell. Scored by pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L
and CIDEr (PTB tokenizer and METEOR need Java; without it they are "skipped: ...").
"""

from __future__ import annotations

import csv
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mllm.data.records import BadRecordError, BadRecords
from mllm.eval.loaders.common import collect, media
from mllm.eval.metrics import caption_metrics, exact_match
from mllm.eval.tasks import Item, Prediction, Scores, Task


@dataclass
class Options:
    captions: str = "clotho_captions_evaluation.csv"
    audio: str = "evaluation/{file_name}"  # formatted with the row's columns
    prompt: str = "Describe the sound in one sentence."


def load(name: str, path: Path, options: Options, bad: BadRecords) -> Task:
    file = path / options.captions
    with open(file, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not any(k.startswith("caption") for k in rows[0]):
        raise ValueError(f"{file}: expected a CSV with a header and caption columns")
    missing = [name for _, name, _, _ in string.Formatter().parse(options.audio) if name and name not in rows[0]]
    if missing:
        raise ValueError(f"audio template {options.audio!r} names column {missing[0]!r}, which {file.name} has not")
    clips: dict[str, tuple[str, list[str]]] = {}  # audio path -> (first row's where, references)
    for n, row in enumerate(rows, 2):
        refs = clips.setdefault(options.audio.format(**row), (f"{file}:{n}", []))[1]
        refs += [v.strip() for k, v in row.items() if k and k.startswith("caption") and v and v.strip()]

    def build(where: str, clip: tuple[str, list[str]]) -> Item:
        audio, refs = clip
        if not refs:
            raise BadRecordError("malformed_message", where, "no captions")
        return Item(audio, options.prompt, refs, [media("audio", path / audio, where)])

    items = collect([(where, (audio, refs)) for audio, (where, refs) in clips.items()], build, bad)
    return Task(name, items, score, max_new_tokens=48, source=str(file))


def score(items: Sequence[Item], predictions: Sequence[Prediction]) -> Scores:
    hyps = {i.id: p.text or "" for i, p in zip(items, predictions)}
    per_item = {i.id: float(exact_match(hyps[i.id], i.answer)) for i in items}
    metrics = caption_metrics({i.id: i.answer for i in items}, hyps) | {"n": len(items)}
    return Scores(metrics, per_item)
