"""LibriSpeech: FLAC utterances with one transcript file per chapter.

    LibriSpeech/test-clean/1089/134686/1089-134686.trans.txt   "1089-134686-0000 HE HOPED THERE WOULD BE STEW ..."
    LibriSpeech/test-clean/1089/134686/1089-134686-0000.flac

Point the task at one subset (test-clean) or at the LibriSpeech folder (every
subset below it, each a category). Scored by corpus WER (jiwer) after
normalisation: lower case, punctuation removed, spaces collapsed. Its items are
transcriptions (mode "transcribe"), so a model that spells speech at its audio
slots answers by joint CTC/attention decoding.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mllm.data.records import BadRecordError, BadRecords
from mllm.eval.loaders.common import collect, media
from mllm.eval.metrics import word_error_rate
from mllm.eval.tasks import Item, Prediction, Scores, Task


@dataclass
class Options:
    suffix: str = ".flac"
    prompt: str = "Transcribe the audio."


def _rows(path: Path):
    for trans in sorted(path.rglob("*.trans.txt")):
        subset = trans.parents[2].name  # <subset>/<speaker>/<chapter>/x.trans.txt
        for n, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                yield f"{trans}:{n}", (line, trans.parent, subset)


def load(name: str, path: Path, options: Options, bad: BadRecords) -> Task:
    def build(where: str, row: tuple[str, Path, str]) -> Item:
        line, folder, subset = row
        utterance, _, transcript = line.strip().partition(" ")
        if not transcript.strip():
            raise BadRecordError("malformed_message", where, "expected '<utterance id> <TRANSCRIPT>'")
        audio = media("audio", folder / f"{utterance}{options.suffix}", where)
        # LibriSpeech's utterance ids are unique across its subsets; other data in its layout may reuse them
        return Item(f"{subset}/{utterance}", options.prompt, transcript.strip(), [audio], category=subset)

    rows = list(_rows(path))
    if not rows:
        raise FileNotFoundError(f"{path}: no LibriSpeech transcripts (<speaker>/<chapter>/*.trans.txt) below it")
    return Task(name, collect(rows, build, bad), score, mode="transcribe", max_new_tokens=96, source=str(path))


def score(items: Sequence[Item], predictions: Sequence[Prediction]) -> Scores:
    hyps = {i.id: p.text or "" for i, p in zip(items, predictions)}
    per_item = {i.id: 1.0 - min(1.0, word_error_rate([i.answer], [hyps[i.id]])["wer"]) for i in items}
    by_subset: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_subset[item.category].append(item)
    metrics = word_error_rate([i.answer for i in items], [hyps[i.id] for i in items]) | {"n": len(items)}
    categories = {s: word_error_rate([i.answer for i in g], [hyps[i.id] for i in g]) | {"n": len(g)}
                  for s, g in sorted(by_subset.items())}
    return Scores(metrics, per_item, categories)
