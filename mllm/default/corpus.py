"""The default model's training corpora: the built corpora, with every audio the assistant speaks padded to one length.

A continuous output head writes a fixed number of features per item (the
engine cannot end a feature span early), so text-to-speech targets are
padded with silence to `seconds` (cropped when longer): the model learns to
say the words and then write silence. Audio the user gives keeps its length.

    prepare_corpora(Path("~/.cache/mllm/corpora"), Path("runs/default/data"), ["digits", "speech"],
                    modalities={"image", "audio"}, seconds=2.4, skip={"stamps": {"image_generation"}})

Half of the questions, multiple-choice items and captioning requests (chosen
by a hash of the record id) are phrased the way LLaVA-1.5's instruction mix and
the benchmarks phrase them ("Answer the question using a single word or
phrase.", "Answer with the option's letter from the given choices directly.",
"Describe the sound in one sentence."), so a tiny model learns both styles.

Records are copied with absolute media paths; only padded audio is written anew
(16-bit WAV at the source's rate), under `<out>/<corpus>/media/`. Records with a
medium the model has no tokenizer for (video, for a model without one) are left out,
and so are the tasks `skip` names for a corpus.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

SPLITS = ("train", "validation")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER = ("Answer with the letter.", "Answer with the option's letter from the given choices directly.")
CAPTION = {"image_caption": "image", "sound_caption": "sound", "video_caption": "video"}


def restyle(record: dict) -> dict:
    """Rephrase the user's instruction in the benchmark style for half of the records (by id)."""
    if hashlib.sha1(record["id"].encode()).digest()[0] % 2:
        return record
    text = next((p for p in reversed(record["messages"][0]["content"]) if p["type"] == "text"), None)
    task = record.get("task")
    if text is None:
        return record
    if text["text"].endswith(LETTER[0]):
        text["text"] = text["text"].removesuffix(LETTER[0]) + LETTER[1]
    elif task in ("image_qa", "video_qa", "speech_qa"):
        text["text"] += SHORT_ANSWER
    elif task in CAPTION:
        text["text"] = f"Describe the {CAPTION[task]} in one sentence."
    return record


def pad_audio(src: Path, dst: Path, seconds: float) -> None:
    """src, silence-padded (or cropped) to `seconds`, written to dst."""
    samples, rate = sf.read(src, dtype="float32", always_2d=True)  # [N, C]
    n = math.ceil(seconds * rate)
    samples = samples[:n]
    samples = np.pad(samples, ((0, n - len(samples)), (0, 0)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    sf.write(dst, samples, rate, subtype="PCM_16")


def _convert(record: dict, corpus_dir: Path, out_dir: Path, seconds: float) -> dict:
    for m, message in enumerate(record["messages"]):
        if not isinstance(message["content"], list):
            continue
        for p, part in enumerate(message["content"]):
            if part["type"] == "text" or "path" not in part:
                continue
            src = corpus_dir / part["path"]
            if message["role"] == "assistant" and part["type"] == "audio":
                dst = out_dir / "media" / f"{record['id']}-{m}-{p}.wav"
                if not dst.is_file():
                    pad_audio(src, dst, seconds)
                src = dst
            part["path"] = str(src.resolve())
    return record


def _modalities(record: dict) -> set[str]:
    return {p["type"] for m in record["messages"] if isinstance(m["content"], list) for p in m["content"]} - {"text"}


def prepare_corpora(corpora: Path, out: Path, names: list[str], modalities: set[str], seconds: float,
                    skip: dict[str, set[str]] | None = None) -> Path:
    """Write `<out>/<corpus>/{train,validation}.jsonl` for each corpus in `names`; returns `out`."""
    skip = skip or {}
    for name in names:
        for split in SPLITS:
            src = corpora / name / f"{split}.jsonl"
            dst = out / name / f"{split}.jsonl"
            if dst.is_file():
                continue
            if not src.is_file():
                raise FileNotFoundError(f"{src}: the {name} corpus is not built (run `mllm data build`)")
            lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
            records = [json.loads(line) for line in lines]
            records = [restyle(_convert(r, corpora / name, out / name, seconds))
                       for r in tqdm(records, desc=f"corpus {name}/{split}", unit="record")
                       if _modalities(r) <= modalities and r.get("task") not in skip.get(name, ())]
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            os.replace(tmp, dst)
    return out
