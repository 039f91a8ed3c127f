"""Built-in offline proxies: the built corpora's test split, written in the real benchmarks' formats.

Real benchmark data cannot be downloaded here, so each proxy writes questions
from the built-in corpora (`mllm data build`) as files of one benchmark's
native layout, and the real loader and scorer read them. They measure the
same kind of skill on far easier data: every result is labelled "proxy".

    pope_proxy           digits        POPE yes/no "Is there a 7 in the image?", random and adversarial negatives
    mme_proxy            digits/stamps MME folders: two yes/no questions per image (acc, acc+)
    mmbench_proxy        stamps        MMBench TSV: which caption matches the picture (CircularEval)
    seed_proxy           stamps/digits/video  SEED-Bench JSON: four-option questions on images and clips
    vqav2_proxy          digits/stamps VQAv2 questions + annotations (one answer, given ten times)
    vqav2_paper_proxy    digits        the same digit questions, each digit redrawn in a pen on a paper of real
                                       handwriting (black ink or pencil on white, blue and red pens, chalk)
    vqav2_offcentre_proxy digits       the paper proxy's, each digit also shrunk to 0.7 of its side and put at
                                       a random place in the frame, as in a box of a scanned form
    videoqa_proxy        video         MSRVTT-QA: which digits appear, which way they move
    videoqa_paper_proxy  video         the same questions, each clip's strokes in one of the paper proxy's pens
    videoqa_offcentre_proxy video      the paper proxy's, each clip also shrunk to 0.7 of its side and put at a
                                       random place in the frame, every frame alike
    asr_proxy            speech/spoken_numbers  LibriSpeech layout (FLAC + trans.txt), WER
    sound_caption_proxy  sounds        Clotho CSV captions, BLEU/METEOR/ROUGE-L/CIDEr
    t2i_proxy            digits        text -> image; the digit judge reads the drawn digit
    tts_proxy            speech        text -> speech; the spoken-digit judge hears the digit
    t2v_proxy            video         text -> video; the digit judge reads the moving digit (frame majority)
                                       and its centroid track the way it moves: "7 up"

`build_proxy(name, corpora)` writes one into the mllm cache, under a key of
its source records, and returns the `TaskSpec` that runs it.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from mllm.data.sources import cache_dir
from mllm.eval.tasks import TaskSpec
from mllm.media import Image, Video, load_image, load_video, save_image, save_video

VERSION = 2  # bump when a proxy's files change (2: t2v targets say the direction too)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CONFUSABLE = {0: 6, 1: 7, 2: 7, 3: 8, 4: 9, 5: 6, 6: 0, 7: 1, 8: 3, 9: 4}  # POPE's "adversarial" negatives


@dataclass(frozen=True)
class Proxy:
    corpora: tuple[str, ...]  # the corpora whose test split it reads
    write: Callable[[Path, Path], None]  # (corpora dir, output dir) -> native files
    loader: str
    options: Callable[[Path], dict[str, Any]]  # corpora dir -> the loader's options


def _records(corpora: Path, corpus: str, *tasks: str) -> Iterator[dict]:
    file = corpora / corpus / "test.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: the {corpus} corpus is not built here (run `mllm data build`)")
    with open(file, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if not tasks or record.get("task") in tasks:
                    yield record


def _media(record: dict, corpora: Path, kind: str, turn: int = 0) -> Path:
    """The file of the first `kind` part of messages[turn]."""
    part = next(p for p in record["messages"][turn]["content"] if p["type"] == kind)
    return corpora / record["corpus"] / part["path"]


def _place(src: Path, dst: Path) -> None:
    """Copy src to dst (a hard link when the filesystem allows)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_json(path: Path, data: Any, lines: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if lines:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in data)
        else:
            json.dump(data, f, ensure_ascii=False, indent=1)


def _digit_images(corpora: Path) -> list[tuple[Path, int]]:
    """Each distinct digit test image once, with its label."""
    seen: dict[Path, int] = {}
    for record in _records(corpora, "digits", "image_qa"):
        seen.setdefault(_media(record, corpora, "image"), int(record["meta"]["label"]))
    return list(seen.items())


def _stamp_mcqs(corpora: Path) -> list[dict]:
    return list(_records(corpora, "stamps", "image_mcq"))


# ---- writers, one per proxy ------------------------------------------------------------------------------------


def write_pope(corpora: Path, out: Path) -> None:
    rng = random.Random(0)
    rows: dict[str, list[dict]] = {"random": [], "adversarial": []}
    for n, (image, label) in enumerate(_digit_images(corpora)):
        name = f"{n:06d}.png"
        _place(image, out / "images" / name)
        negatives = {"random": rng.choice([d for d in range(10) if d != label]), "adversarial": CONFUSABLE[label]}
        for setting, other in negatives.items():
            for digit, answer in ((label, "yes"), (other, "no")):
                rows[setting].append({"question_id": len(rows[setting]) + 1, "image": name,
                                      "text": f"Is there a {digit} in the image?", "label": answer})
    for setting, questions in rows.items():
        _write_json(out / f"digits_pope_{setting}.json", questions, lines=True)


def write_mme(corpora: Path, out: Path) -> None:
    rng = random.Random(0)
    for n, (image, label) in enumerate(_digit_images(corpora)):
        other = rng.choice([d for d in range(10) if d != label])
        _place(image, out / "digit_identity" / f"{n:06d}.png")
        lines = [f"Is this a {label}? Please answer yes or no.\tYes", f"Is this a {other}? Please answer yes or no.\tNo"]
        (out / "digit_identity" / f"{n:06d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for n, record in enumerate(_records(corpora, "stamps", "image_qa")):
        meta = record["meta"]
        other = rng.choice([c for c in meta["categories"] if c != meta["answer"]])
        _place(_media(record, corpora, "image"), out / "stamp_category" / f"{n:06d}.png")
        lines = [f"Is this picture in the category {meta['answer']}? Please answer yes or no.\tYes",
                 f"Is this picture in the category {other}? Please answer yes or no.\tNo"]
        (out / "stamp_category" / f"{n:06d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_mmbench(corpora: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category", "split"]
    with open(out / "stamps_mmbench_dev.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(columns)
        for n, record in enumerate(_stamp_mcqs(corpora)):
            meta = record["meta"]
            image = base64.b64encode(_media(record, corpora, "image").read_bytes()).decode("ascii")
            writer.writerow([n, "Which caption matches the picture?", "", *meta["choices"], meta["answer_letter"],
                             meta["category"], image, "stamps", "dev"])


def write_seed(corpora: Path, out: Path) -> None:
    rng = random.Random(0)
    dimensions = {"Stamp Caption": 1, "Digit Identity": 2, "Digit Motion": 10}
    questions = []

    def add(kind: int, data_type: str, data_id: str, question: str, choices: list[str], answer: int) -> None:
        questions.append({"question_id": str(len(questions)), "question_type_id": kind, "data_type": data_type,
                          "data_id": data_id, "question": question, "answer": "ABCD"[answer],
                          **{f"choice_{c}": text for c, text in zip("abcd", choices)}})

    for n, record in enumerate(_stamp_mcqs(corpora)):
        data_id = f"stamps_{n:06d}.png"
        _place(_media(record, corpora, "image"), out / "SEED-Bench-image" / data_id)
        add(1, "image", data_id, "Which caption matches the picture?", record["meta"]["choices"], record["meta"]["answer"])
    for n, (image, label) in enumerate(_digit_images(corpora)):
        data_id = f"digits_{n:06d}.png"
        _place(image, out / "SEED-Bench-image" / data_id)
        choices = [label] + rng.sample([d for d in range(10) if d != label], 3)
        rng.shuffle(choices)
        add(2, "image", data_id, "Which digit is this?", [str(d) for d in choices], choices.index(label))
    for n, record in enumerate(r for r in _records(corpora, "video", "video_qa") if r["meta"]["question_type"] == "direction"):
        data_id = f"video_{n:06d}.mp4"
        _place(_media(record, corpora, "video"), out / "SEED-Bench-video" / data_id)
        choices = record["meta"]["choices"]
        add(10, "video", data_id, "Which way do the digits move?", choices, choices.index(record["meta"]["answer"]))
    _write_json(out / "SEED-Bench.json", {"question_type": dimensions, "questions": questions})


# (ink, paper) RGB in [0, 1] of real handwriting, taken in turn by the test digits of vqav2_paper_proxy
PENS_ON_PAPER = (
    ((0.05, 0.05, 0.05), (0.97, 0.97, 0.95)),  # black ink on white paper
    ((0.10, 0.20, 0.60), (0.98, 0.98, 0.98)),  # a blue ballpoint
    ((0.35, 0.35, 0.35), (0.96, 0.94, 0.86)),  # pencil on cream paper
    ((0.70, 0.10, 0.10), (1.00, 1.00, 1.00)),  # a red pen
    ((0.92, 0.92, 0.90), (0.18, 0.30, 0.22)),  # chalk on a green board
)


OFF_CENTRE = 0.7  # vqav2_offcentre_proxy's digit images shrink to this fraction of their side
Redraw = Callable[[int], Callable[[Path, Path], None]]  # a medium's id -> how to write it (src, dst)


def _in_pen(pixels: np.ndarray, k: int) -> np.ndarray:
    """uint8 [..., H, W, 3] white strokes on black -> the same strokes in the k-th pen on its paper (cycling)."""
    ink, paper = (np.array(c, dtype=np.float32) for c in PENS_ON_PAPER[k % len(PENS_ON_PAPER)])
    strokes = pixels.mean(-1, keepdims=True) / 255  # [..., H, W, 1]: 1 on the strokes
    return np.round(255 * (paper + (ink - paper) * strokes)).astype(np.uint8)


def _off_centre(frames: np.ndarray, k: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> the same, every frame shrunk to OFF_CENTRE of its side and put at one random place in
    the frame (seeded by k), black around it."""
    t, h, w, _ = frames.shape
    small = np.stack([Image(f).resize((round(OFF_CENTRE * h), round(OFF_CENTRE * w))).pixels for f in frames])
    y, x = np.random.default_rng(k).integers(0, (h - small.shape[1] + 1, w - small.shape[2] + 1))
    out = np.zeros_like(frames)
    out[:, y:y + small.shape[1], x:x + small.shape[2]] = small
    return out


def _on_paper(k: int, off_centre: bool = False) -> Callable[[Path, Path], None]:
    """Writes a white-on-black digit image as the same strokes in the k-th pen on its paper (cycling); with
    `off_centre`, shrunk and moved first (`_off_centre`), as a digit sits in a box of a scanned form."""

    def write(src: Path, dst: Path) -> None:
        pixels = load_image(src).pixels
        if off_centre:
            pixels = _off_centre(pixels[None], k)[0]
        save_image(Image(_in_pen(pixels, k)), dst)
    return write


def _clip_on_paper(k: int, off_centre: bool = False) -> Callable[[Path, Path], None]:
    """Writes a white-on-black clip as the same strokes in the k-th pen on its paper, every frame; with
    `off_centre`, every frame shrunk and moved alike first (`_off_centre`), as another renderer may frame a clip."""

    def write(src: Path, dst: Path) -> None:
        video = load_video(src)
        frames = _off_centre(video.frames, k) if off_centre else video.frames
        save_video(Video(_in_pen(frames, k), video.fps), dst)
    return write


def _as_is(k: int) -> Callable[[Path, Path], None]:  # the Redraw that copies every medium unchanged
    return _place


def write_vqav2(corpora: Path, out: Path, corpus_names: tuple[str, ...] = ("digits", "stamps"),
                redraw: Redraw = _as_is) -> None:
    """VQAv2's files; `redraw(image_id)` writes each image (a copy by default; `_on_paper` in a pen)."""
    answer_types = {"yes_no": "yes/no", "digit": "number", "parity": "other", "category": "other"}
    image_ids: dict[Path, int] = {}
    questions, annotations = [], []
    records = [r for corpus in corpus_names for r in _records(corpora, corpus, "image_qa")]
    for record in records:
        image = _media(record, corpora, "image")
        if image not in image_ids:
            image_ids[image] = len(image_ids)
            redraw(image_ids[image])(image, out / "images" / f"{image_ids[image]:06d}.png")
        meta, qid = record["meta"], len(questions)
        questions.append({"question_id": qid, "image_id": image_ids[image], "question": meta["question"]})
        annotations.append({"question_id": qid, "image_id": image_ids[image], "question_type": meta["question_type"],
                            "answer_type": answer_types.get(meta["question_type"], "other"),
                            "answers": [{"answer": meta["answer"], "answer_id": k + 1} for k in range(10)]})
    _write_json(out / "questions.json", {"questions": questions})
    _write_json(out / "annotations.json", {"annotations": annotations})


def write_videoqa(corpora: Path, out: Path, redraw: Redraw = _as_is) -> None:
    """MSRVTT-QA's files; `redraw(video_id)` writes each clip (a copy by default; `_clip_on_paper` in a pen)."""
    video_ids: dict[Path, int] = {}
    rows = []
    for record in _records(corpora, "video", "video_qa"):
        video = _media(record, corpora, "video")
        if video not in video_ids:
            video_ids[video] = len(video_ids)
            redraw(video_ids[video])(video, out / "video" / f"video{video_ids[video]}.mp4")
        rows.append({"id": len(rows), "video_id": video_ids[video], "question": record["meta"]["question"],
                     "answer": record["meta"]["answer"]})
    _write_json(out / "test_qa.json", rows)


def _write_librispeech(records: list[dict], corpora: Path, subset: Path) -> None:
    """Speakers are voices; one chapter each; FLAC audio and an upper-case trans.txt, as LibriSpeech has."""
    speakers: dict[str, list[dict]] = {}
    for record in records:
        speakers.setdefault(record["meta"].get("voice") or record["meta"].get("language", "0"), []).append(record)
    for s, (_, utterances) in enumerate(sorted(speakers.items())):
        folder = subset / str(s + 1) / "1"
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for u, record in enumerate(utterances):
            name = f"{s + 1}-1-{u:04d}"
            samples, rate = sf.read(_media(record, corpora, "audio"), dtype="float32")
            sf.write(folder / f"{name}.flac", samples, rate, format="FLAC", subtype="PCM_16")
            lines.append(f"{name} {record['meta']['transcript'].upper()}")
        (folder / f"{s + 1}-1.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_asr(corpora: Path, out: Path) -> None:
    _write_librispeech(list(_records(corpora, "speech", "asr")), corpora, out / "test-clean")
    if (corpora / "spoken_numbers" / "test.jsonl").is_file():  # real recordings, eval-only
        _write_librispeech(list(_records(corpora, "spoken_numbers", "asr")), corpora, out / "test-real")


def write_sound_captions(corpora: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "clotho_captions_evaluation.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
        for n, record in enumerate(_records(corpora, "sounds", "sound_caption")):
            name = f"{n:06d}.wav"
            _place(_media(record, corpora, "audio"), out / "evaluation" / name)
            writer.writerow([name, record["meta"]["caption"], "", "", "", ""])


def write_t2i(corpora: Path, out: Path) -> None:
    rows = [{"id": r["id"], "prompt": r["meta"]["prompt"], "target": str(r["meta"]["label"])}
            for r in _records(corpora, "digits", "image_generation")]
    _write_json(out / "t2i.jsonl", rows, lines=True)


def write_tts(corpora: Path, out: Path) -> None:
    rows = [{"id": r["id"], "prompt": r["meta"]["prompt"], "target": str(DIGIT_WORDS.index(r["meta"]["transcript"]))}
            for r in _records(corpora, "speech", "tts") if r["meta"]["transcript"] in DIGIT_WORDS]
    _write_json(out / "tts.jsonl", rows, lines=True)


def write_t2v(corpora: Path, out: Path) -> None:
    rows = [{"id": r["id"], "prompt": r["meta"]["prompt"], "target": f"{r['meta']['digits'][0]} {r['meta']['direction']}"}
            for r in _records(corpora, "video", "video_generation") if r["meta"]["num_digits"] == 1]
    _write_json(out / "t2v.jsonl", rows, lines=True)


def _generation(modality: str, judge: str) -> Callable[[Path], dict[str, Any]]:
    return lambda corpora: {"generate": modality, "judge": judge, "judge_data": str(corpora)}


def _vqav2_files(corpora: Path) -> dict[str, str]:  # the loader's options for what write_vqav2 writes
    return {"questions": "questions.json", "annotations": "annotations.json", "images": "images/{image_id:06d}.png"}


PROXIES: dict[str, Proxy] = {
    "pope_proxy": Proxy(("digits",), write_pope, "pope", lambda c: {"files": "digits_pope_*.json", "images": "images"}),
    "mme_proxy": Proxy(("digits", "stamps"), write_mme, "mme", lambda c: {}),
    "mmbench_proxy": Proxy(("stamps",), write_mmbench, "mmbench", lambda c: {}),
    "seed_proxy": Proxy(("stamps", "digits", "video"), write_seed, "seed", lambda c: {}),
    "vqav2_proxy": Proxy(("digits", "stamps"), write_vqav2, "vqav2", _vqav2_files),
    "vqav2_paper_proxy": Proxy(("digits",), partial(write_vqav2, corpus_names=("digits",), redraw=_on_paper), "vqav2",
                               _vqav2_files),
    "vqav2_offcentre_proxy": Proxy(("digits",), partial(write_vqav2, corpus_names=("digits",),
                                                        redraw=partial(_on_paper, off_centre=True)), "vqav2", _vqav2_files),
    "videoqa_proxy": Proxy(("video",), write_videoqa, "videoqa", lambda c: {}),
    "videoqa_paper_proxy": Proxy(("video",), partial(write_videoqa, redraw=_clip_on_paper), "videoqa", lambda c: {}),
    "videoqa_offcentre_proxy": Proxy(("video",), partial(write_videoqa, redraw=partial(_clip_on_paper, off_centre=True)),
                                     "videoqa", lambda c: {}),
    "asr_proxy": Proxy(("speech", "spoken_numbers"), write_asr, "librispeech", lambda c: {}),
    "sound_caption_proxy": Proxy(("sounds",), write_sound_captions, "captioning", lambda c: {}),
    "t2i_proxy": Proxy(("digits",), write_t2i, "jsonl", _generation("image", "digits")),
    "tts_proxy": Proxy(("speech",), write_tts, "jsonl", _generation("audio", "spoken_digits")),
    "t2v_proxy": Proxy(("video",), write_t2v, "jsonl", _generation("video", "moving_digits")),
}
FILES = {"mmbench_proxy": "stamps_mmbench_dev.tsv", "t2i_proxy": "t2i.jsonl", "tts_proxy": "tts.jsonl", "t2v_proxy": "t2v.jsonl"}


def _key(name: str, corpora: Path) -> str:
    """Changes with the proxy's version and the bytes of the test records it reads."""
    h = hashlib.sha256(f"{name}\0{VERSION}\0{corpora.resolve()}\0".encode())
    for corpus in PROXIES[name].corpora:
        file = corpora / corpus / "test.jsonl"
        h.update(file.read_bytes() if file.is_file() else b"-")
    return h.hexdigest()[:16]


def build_proxy(name: str, corpora: str | os.PathLike, root: str | os.PathLike | None = None) -> TaskSpec:
    """Write proxy `name` from the built corpora (once: a finished build is reused) and return its spec."""
    if name not in PROXIES:
        raise KeyError(f"unknown proxy {name!r} (known: {', '.join(PROXIES)})")
    corpora = Path(corpora)
    proxy = PROXIES[name]
    root = Path(root) if root is not None else cache_dir() / "eval" / "proxies"
    out = root / f"{name}-{_key(name, corpora)}"
    if not out.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
        try:
            proxy.write(corpora, tmp)
            os.replace(tmp, out)
        except OSError:
            if not out.is_dir():  # else another process finished the same build first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    path = out / FILES[name] if name in FILES else out  # the loaders that read one file get that file
    return TaskSpec(proxy.loader, str(path), name=name, options=proxy.options(corpora), proxy=True)

