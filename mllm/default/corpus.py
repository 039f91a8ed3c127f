"""The default model's training corpora: the built corpora, with every audio the assistant speaks in one voice and
padded to one length, and every digit it draws or animates in one hand.

A continuous output head writes a fixed number of features per item (the
engine cannot end a feature span early), so text-to-speech targets are
padded with silence to `seconds` (cropped when longer): the model learns to
say the words and then write silence. Audio the user gives keeps its length.

The built speech corpus speaks each reply in one of ~150 random voices, rates and
pitches. Read out by its mixture mean, a GMM head writes the average of those:
no voice at all. So every spoken reply whose words are known (the record's
transcript) is re-spoken in one house `voice`, as a single-speaker TTS corpus
would be; the user's audio keeps its many voices, which the model must
understand. Each distinct reply is synthesized once. For the same reason the
assistant's animations are re-rendered in the canonical layout (`render_clip`
without an rng): one clip per request instead of a digit in any lane. And every
digit the assistant draws or animates is written in one house hand
(`house_hand`: for each digit, the train image nearest its class's mean image),
as a single-writer corpus would: the prompt names the digit and nothing of the
writer, so a head read out by its mean would otherwise learn the average of a
thousand hands. What the user shows keeps every hand, lane and layout.

    prepare_corpora(Path("~/.cache/mllm/corpora"), Path("runs/default/data"), ["digits", "speech"],
                    modalities={"image", "audio"}, seconds=2.4, skip={"stamps": {"image_generation"}},
                    voice=HOUSE_VOICE)

Half of the questions, multiple-choice items and captioning requests (chosen
by a hash of the record id) are phrased the way LLaVA-1.5's instruction mix and
the benchmarks phrase them ("Answer the question using a single word or
phrase.", "Answer with the option's letter from the given choices directly.",
"Describe the sound in one sentence."), so a tiny model learns both styles.

Records are copied with absolute media paths; only spoken replies are written anew
(16-bit WAV at the source's rate, written whole or not at all), under `<out>/<corpus>/media/`. Records with a
medium the model has no tokenizer for (video, for a model without one) are left out,
and so are the tasks `skip` names for a corpus.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from mllm.data.corpora import stable_hash
from mllm.data.corpora.build import Fractions
from mllm.data.corpora.digits import digit_rgb, load_mnist, split_indices
from mllm.data.corpora.speech import Voice, synthesize
from mllm.data.corpora.video import render_clip
from mllm.media import Audio, Image, Video, save_audio, save_image, save_video

SPLITS = ("train", "validation")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER = ("Answer with the letter.", "Answer with the option's letter from the given choices directly.")
CAPTION = {"image_caption": "image", "sound_caption": "sound", "video_caption": "video"}
HAND_CORPORA = ("digits", "interleaved")  # the corpora whose assistant images are MNIST digits
CLIP_CORPORA = ("video", "interleaved")  # the corpora whose assistant clips are moving MNIST digits
# A plain training voice (not one of the held-out test voices), unhurried, no noise.
HOUSE_VOICE = Voice(accent="en-us", variant="m1", rate=150, pitch=50, gap=0, gain=0.9, snr_db=None, noise_seed=0,
                    held_out=False)


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
    elif task in ("image_qa", "video_qa", "video_lane_qa", "speech_qa"):
        text["text"] += SHORT_ANSWER
    elif task in CAPTION:
        text["text"] = f"Describe the {CAPTION[task]} in one sentence."
    return record


def fit(audio: Audio, seconds: float) -> Audio:
    """audio silence-padded (or cropped) to `seconds`."""
    n = math.ceil(seconds * audio.sample_rate)
    x = audio.samples[:, :n]  # [C, <=n]
    return Audio(np.pad(x, ((0, 0), (0, n - x.shape[1]))), audio.sample_rate)


def spoken_words(record: dict) -> list[str | None]:
    """The transcript of each audio part of a record, in order; None where it is not speech (sounds)."""
    n = sum(p["type"] == "audio" for m in record["messages"] if isinstance(m["content"], list) for p in m["content"])
    meta = record.get("meta") or {}
    if "speech" in meta and len(meta["speech"]) == n:  # interleaved: one voice entry per audio part
        return [s.get("transcript") for s in meta["speech"]]
    if "transcript" in meta and n == 1:  # speech corpus
        return [meta["transcript"]]
    return [None] * n


def _key(*parts) -> str:
    return f"{stable_hash(json.dumps(parts)):016x}"


def _reply(src: Path, words: str | None, out_dir: Path, seconds: float, voice: Voice | None) -> Path:
    """The spoken reply the model learns to write: in the house voice where its words are known, padded."""
    if voice is None or not words:
        dst = out_dir / "media" / f"{src.parent.name}-{src.stem}-{seconds:g}s.wav"
        if not dst.is_file():
            samples, rate = sf.read(src, dtype="float32", always_2d=True)  # [N, C]
            save_audio(fit(Audio(samples.T, rate), seconds), dst)
        return dst
    rate = sf.info(src).samplerate  # the reply keeps its corpus's rate
    key = _key(voice.name, voice.rate, voice.pitch, voice.gap, voice.gain, words, rate, seconds)
    dst = out_dir / "media" / f"voice-{key}.wav"
    if not dst.is_file():
        save_audio(fit(synthesize(words, voice, rate), seconds), dst)
    return dst


def house_hand(fractions: Fractions, per_class: int | None = None) -> dict[int, int]:
    """{digit: MNIST index}: for each digit, the train image nearest (in pixels) its class's mean train image."""
    hand = {}
    for label, arr in enumerate(load_mnist()):
        idx = split_indices(len(arr), fractions, "train")[:per_class]
        x = arr[idx.start:idx.stop].reshape(len(idx), -1).astype(np.float32)  # [n, 784]
        hand[label] = idx.start + int(np.argmin(((x - x.mean(0)) ** 2).sum(1)))
    return hand


def _digit(record: dict) -> int:
    """The one digit an assistant image of the digits or interleaved corpus shows: meta.label, meta.drawn (a sample
    that also reads other digits) or meta.digits."""
    meta = record.get("meta") or {}
    digits = [meta["label"]] if "label" in meta else meta.get("drawn", meta.get("digits", []))
    if len(digits) != 1:
        raise ValueError(f"record {record.get('id')!r}: a drawn digit needs meta.label or one meta.drawn or "
                         f"meta.digits entry, got {({k: meta[k] for k in ('label', 'drawn', 'digits') if k in meta})}")
    return int(digits[0])


def _drawing(digit: int, hand: dict[int, int], size: int, out_dir: Path) -> Path:
    """The image the model learns to draw for a digit: that digit in the house hand."""
    dst = out_dir / "media" / f"hand-{digit}-{hand[digit]}-{size}.png"
    if not dst.is_file():
        save_image(Image(digit_rgb(digit, hand[digit], size)), dst)
    return dst


def _animation(record: dict, clips: dict, hand: dict[int, int] | None, out_dir: Path) -> Path:
    """The clip the model learns to make for a video request: its digits (in the house hand, when there is one)
    and direction, in the canonical layout."""
    meta = record.get("meta") or {}
    need = {"digits", "direction"} | ({"source_indices"} if hand is None else set())
    if not need <= meta.keys():
        raise ValueError(f"record {record.get('id')!r}: a video request needs meta.{', meta.'.join(sorted(need))} "
                         f"to be re-rendered, got {sorted(meta)}")
    indices = [hand[d] for d in meta["digits"]] if hand is not None else meta["source_indices"]
    dst = out_dir / "media" / f"clip-{_key(meta['digits'], indices, meta['direction'], clips)}.mp4"
    if not dst.is_file():
        mnist = load_mnist()
        glyphs = [mnist[d][i] for d, i in zip(meta["digits"], indices)]
        frames = render_clip(glyphs, meta["direction"], None, frames=clips["frames"], size=clips["size"],
                             digit_size=clips["digit_size"])
        save_video(Video(frames, clips["fps"]), dst)
    return dst


@dataclass(frozen=True)
class Replies:
    """How the assistant's media are rewritten: spoken replies padded to `seconds` (in `voice`, when set),
    clips re-rendered in the canonical layout (the corpora's video config, when set) and digits drawn in `hand`
    (when set) at `image_size`."""

    seconds: float
    voice: Voice | None
    clips: dict | None
    hand: dict[int, int] | None
    image_size: int


def _convert(record: dict, corpus: str, corpus_dir: Path, out_dir: Path, replies: Replies) -> dict:
    words = iter(spoken_words(record))
    for message in record["messages"]:
        if not isinstance(message["content"], list):
            continue
        for part in message["content"]:
            if part["type"] == "text" or "path" not in part:
                continue
            src = corpus_dir / part["path"]
            said = next(words) if part["type"] == "audio" else None
            if message["role"] == "assistant" and part["type"] == "audio":
                src = _reply(src, said, out_dir, replies.seconds, replies.voice)
            elif message["role"] == "assistant" and part["type"] == "video" and replies.clips:
                src = _animation(record, replies.clips, replies.hand, out_dir)
            elif message["role"] == "assistant" and part["type"] == "image" and replies.hand and corpus in HAND_CORPORA:
                src = _drawing(_digit(record), replies.hand, replies.image_size, out_dir)
            part["path"] = str(src.resolve())
    return record


def _modalities(record: dict) -> set[str]:
    return {p["type"] for m in record["messages"] if isinstance(m["content"], list) for p in m["content"]} - {"text"}


def prepare_corpora(corpora: Path, out: Path, names: list[str], modalities: set[str], seconds: float,
                    skip: dict[str, set[str]] | None = None, voice: Voice | None = HOUSE_VOICE,
                    canonical_clips: bool = True, one_hand: bool = True) -> Path:
    """Write `<out>/<corpus>/{train,validation}.jsonl` for each corpus in `names`; returns `out`.

    `voice`: the voice of every spoken reply whose words are known; None keeps the corpus's recordings.
    `canonical_clips`: re-render the assistant's animations (video and interleaved corpora) in the canonical layout.
    `one_hand`: write every digit the assistant draws or animates in the house hand.
    """
    skip = skip or {}
    wants_clips = canonical_clips and bool(set(CLIP_CORPORA) & set(names))
    wants_hand = one_hand and bool({*HAND_CORPORA, *CLIP_CORPORA} & set(names))
    config = {}
    if wants_clips or wants_hand:
        manifest = corpora / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: the corpora's manifest is missing (rebuild with `mllm data build`)")
        config = json.loads(manifest.read_text())["config"]
    hand, image_size = None, 0
    if wants_hand:
        if "digits" not in config:
            raise KeyError(f"{corpora / 'manifest.json'}: no digits config, which the house hand is drawn from")
        digits = config["digits"]
        per_class = (digits.get("per_class") or {}).get("train")
        hand, image_size = house_hand(Fractions(**digits["fractions"]), per_class), int(digits["image_size"])
    replies = Replies(seconds, voice, config["video"] if wants_clips else None, hand, image_size)
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
            records = [restyle(_convert(r, name, corpora / name, out / name, replies))
                       for r in tqdm(records, desc=f"corpus {name}/{split}", unit="record")
                       if _modalities(r) <= modalities and r.get("task") not in skip.get(name, ())]
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            os.replace(tmp, dst)
    return out
