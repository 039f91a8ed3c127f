"""Captioned Tux Paint stamps (Debian `tuxpaint-stamps-default`): captions, QA, 4-way choice, text->image.

A stamp is a PNG with an English caption on the first line of the `.txt`
beside it (SVG-only stamps are skipped: rendering SVG needs another library).
Stamps are split by caption group (case, punctuation and articles dropped), so
two stamps with the same caption — `frog` and `frog-1` — always share a split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from mllm.data import sources
from mllm.data.corpora import (
    SPLITS, BuildContext, CorpusResult, assistant, choice_letters, media_part, multiple_choice_prompt,
    normalise_caption, register_corpus, split_exact, text, user,
)

CAPTION_PROMPTS = ("Describe this picture.", "What is in this image?", "Write a short caption for this picture.")
GEN_PROMPTS = ("Draw this: {c}", "Make a picture of this: {c}", "Show me a picture. {c}")
CATEGORY_QUESTION = "Which category does this picture belong to?"


@dataclass(frozen=True)
class Stamp:
    path: Path  # the PNG
    rel: str  # path under the stamps dir, without suffix
    caption: str
    category: str  # top-level folder: animals, vehicles, ...
    mirror_ok: bool

    @property
    def group(self) -> str:
        return normalise_caption(self.caption)


def read_caption(txt: Path) -> str:
    """The English caption: the first non-empty line of a stamp's `.txt`."""
    for line in txt.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and "=" not in line.split(" ")[0]:
            return line
    return ""


def find_stamps(root: Path | None = None) -> list[Stamp]:
    """Every captioned PNG stamp, sorted by path."""
    root = root or sources.stamps_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(".png"):
                continue
            png = Path(dirpath) / name
            txt = png.with_suffix(".txt")
            if not txt.is_file():
                continue
            caption = read_caption(txt)
            if not caption:
                continue
            dat = png.with_suffix(".dat")
            flags = dat.read_text(errors="replace").split() if dat.is_file() else []
            rel = png.relative_to(root).with_suffix("").as_posix()
            out.append(Stamp(png, rel, caption, rel.split("/")[0], "nomirror" not in flags))
    return out


def render_stamp(
    png: Path, size: int, scale: float = 1.0, offset: tuple[float, float] = (0.5, 0.5), mirror: bool = False
) -> np.ndarray:
    """uint8 [size, size, 3]: the stamp composited on white, fitted into `scale*size`, placed at `offset`."""
    img = PIL.Image.open(png)
    img.load()
    rgba = np.asarray(img.convert("RGBA")).astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    rgb = np.round(rgba[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    im = PIL.Image.fromarray(rgb)
    if mirror:
        im = im.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    box = max(1, int(round(size * scale)))
    w, h = im.size
    f = box / max(w, h)
    nw, nh = max(1, int(round(w * f))), max(1, int(round(h * f)))
    im = im.resize((nw, nh), PIL.Image.Resampling.LANCZOS)
    canvas = PIL.Image.new("RGB", (size, size), (255, 255, 255))
    x = int(round((size - nw) * offset[0]))
    y = int(round((size - nh) * offset[1]))
    canvas.paste(im, (x, y))
    return np.asarray(canvas)


def split_stamps(stamps: list[Stamp], fractions) -> dict[str, list[Stamp]]:
    assign = split_exact([s.group for s in stamps], fractions, salt="stamps")
    return {split: [s for s in stamps if assign[s.group] == split] for split in SPLITS}


@register_corpus("stamps")
def build(ctx: BuildContext) -> CorpusResult:
    from mllm.media import Image, save_image

    cfg = ctx.cfg.stamps
    info = sources.source_info("stamps")
    stamps = find_stamps()
    if cfg.max_stamps is not None:  # a spread over all folders, not the first folder only
        step = max(1, len(stamps) // cfg.max_stamps)
        stamps = stamps[::step][: cfg.max_stamps]
    by_split = split_stamps(stamps, cfg.fractions)
    by_split = {s: v[: ctx.cap(len(v))] for s, v in by_split.items()}
    categories = sorted({s.category for s in stamps})
    out = ctx.output("stamps")
    total = sum(len(v) * (cfg.train_variants if s == "train" else 1) for s, v in by_split.items())
    bar = ctx.bar(total, "stamps")
    k_choices = cfg.num_choices
    with out:
        for split in SPLITS:
            rng = ctx.rng("stamps", split)
            pool = by_split[split]
            n_variants = max(1, cfg.train_variants) if split == "train" else 1
            k = 0
            for stamp in pool:
                for v in range(n_variants):
                    if v == 0:
                        pixels = render_stamp(stamp.path, cfg.image_size)
                        aug = None
                    else:
                        scale = float(rng.uniform(0.6, 1.0))
                        offset = (float(rng.uniform()), float(rng.uniform()))
                        mirror = bool(stamp.mirror_ok and rng.random() < 0.5)
                        pixels = render_stamp(stamp.path, cfg.image_size, scale, offset, mirror)
                        aug = {"scale": round(scale, 3), "offset": [round(o, 3) for o in offset], "mirror": mirror}
                    path, rel = out.media(split, f"{k:06d}.png")
                    k += 1
                    save_image(Image(pixels), path)
                    img = media_part("image", rel)
                    base = {"stamp": stamp.rel, "caption": stamp.caption, "category": stamp.category, "variant": v}
                    if aug:
                        base["augment"] = aug
                    cap_prompt = CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))]
                    gen_prompt = GEN_PROMPTS[rng.integers(len(GEN_PROMPTS))].format(c=stamp.caption)
                    others = sorted({s.caption for s in pool if s.group != stamp.group})
                    if len(others) >= k_choices - 1:
                        picks = rng.choice(len(others), size=k_choices - 1, replace=False)
                        answer = int(rng.integers(k_choices))
                        choices = [others[i] for i in picks]
                        choices.insert(answer, stamp.caption)
                    else:
                        choices = None
                    if "image_caption" in cfg.tasks:
                        out.add(split, "image_caption", [user(img, text(cap_prompt)), assistant(text(stamp.caption))],
                                base)
                    if "image_qa" in cfg.tasks:
                        out.add(split, "image_qa",
                                [user(img, text(CATEGORY_QUESTION)), assistant(text(stamp.category))],
                                {**base, "question": CATEGORY_QUESTION, "answer": stamp.category,
                                 "question_type": "category", "categories": categories})
                    if "image_mcq" in cfg.tasks and choices is not None:
                        letter = choice_letters(k_choices)[answer]
                        prompt = multiple_choice_prompt("Which caption matches the picture?", choices)
                        out.add(split, "image_mcq", [user(img, text(prompt)), assistant(text(letter))],
                                {**base, "choices": choices, "answer": answer, "answer_letter": letter})
                    if "image_generation" in cfg.tasks:
                        out.add(split, "image_generation", [user(text(gen_prompt)), assistant(img)],
                                {**base, "prompt": gen_prompt})
                    bar.update(1)
    bar.close()
    return CorpusResult(
        name="stamps", sources=[info], counts=dict(out.counts), tasks=out.tasks,
        extra={
            "stamps_per_split": {s: len(v) for s, v in by_split.items()},
            "split_rule": "by caption group (exact fractions over groups ordered by a stable hash)",
            "categories": categories,
        },
    )
