"""Moving-digit clips made from real MNIST digits: which digits, which way, which digit in which lane, text->video.

A clip has `frames` frames of `size`x`size` at `fps`: one or more real digits
(scaled to `digit_size`) slide in one of four directions. Each split draws its
digits from the same split of the MNIST package (see `digits.py`), so a test
clip never shows a training digit.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image

from mllm.data import sources
from mllm.data.corpora import (
    DIRECTIONS, SPLITS, BuildContext, CorpusResult, assistant, media_part, register_corpus, text, user,
)
from mllm.data.corpora.digits import load_mnist, split_pool

SIDEWAYS = ("left", "right")  # digits moving sideways sit in lanes one above the other; otherwise side by side


def render_clip(digits: list[np.ndarray], direction: str, rng: np.random.Generator | None, *, frames: int = 8,
                size: int = 32, digit_size: int = 16) -> np.ndarray:
    """uint8 [frames, size, size, 3]: the gray 28x28 `digits` moving `direction`, in lanes across the motion.

    `rng` places a single digit's lane and where the motion starts and ends; None gives the canonical layout
    (the middle lane, from 1/8 to 7/8 of the way): one clip per request, which a model can learn exactly.
    """
    k = len(digits)
    glyphs = [np.asarray(PIL.Image.fromarray(d).resize((digit_size, digit_size), PIL.Image.Resampling.BILINEAR))
              for d in digits]
    room = size - digit_size
    if k > 1:
        lanes = [int(round(x)) for x in np.linspace(0, room, k)]
    else:
        lanes = [room // 2 if rng is None else int(rng.integers(0, room + 1))]
    start = 0.125 * room if rng is None else rng.uniform(0, 0.25 * room)
    end = 0.875 * room if rng is None else rng.uniform(0.75 * room, room)
    if direction in ("left", "up"):
        start, end = room - start, room - end
    out = np.zeros((frames, size, size), dtype=np.uint8)
    for t in range(frames):
        pos = int(round(start + (end - start) * t / max(1, frames - 1)))
        for glyph, lane in zip(glyphs, lanes):
            y, x = (lane, pos) if direction in SIDEWAYS else (pos, lane)
            region = out[t, y:y + digit_size, x:x + digit_size]
            np.maximum(region, glyph, out=region)
    return np.repeat(out[..., None], 3, axis=3)


def digits_phrase(labels: list[int]) -> str:
    s = sorted(labels)
    return str(s[0]) if len(s) == 1 else ", ".join(map(str, s[:-1])) + f" and {s[-1]}"


def lane_questions(labels: list[int], direction: str) -> list[tuple[str, str]]:
    """(question, digit) for each lane of a clip of several digits, in lane order (`render_clip`'s first lane is
    the top one when the digits move sideways, the left one when they move up or down); none for one digit."""
    k = len(labels)
    if k < 2:
        return []
    sides = ("top", "bottom") if direction in SIDEWAYS else ("left", "right")
    if k == 2:
        return [(f"Which digit is on the {side}?", str(lab)) for side, lab in zip(sides, labels)]
    return [(f"Which digit is in lane {i + 1} from the {sides[0]}?", str(lab)) for i, lab in enumerate(labels)]


def describe(labels: list[int], direction: str) -> str:
    if len(labels) == 1:
        return f"The digit {labels[0]} moves {direction}."
    return f"The digits {digits_phrase(labels)} move {direction}."


GEN_PROMPTS = ("Show {what} moving {d}.", "Make a video of {what} moving {d}.", "Animate {what} going {d}.")
DIGITS_QUESTION = "Which digits appear in the video?"


def by_label(pool: list[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for lab, idx in pool:
        out.setdefault(lab, []).append(idx)
    return out


def distinct_clips(by_label: dict[int, list[int]], max_digits: int, min_digits: int = 1) -> int:
    """How many different clips `sample_clip` can draw: ordered distinct labels, an image each, a direction."""
    sizes = [len(by_label.get(lab, [])) for lab in range(10)]
    # e[k]: Σ over k-sets of labels of the product of their pool sizes (elementary symmetric polynomials)
    e = [1] + [0] * max_digits
    for n in sizes:
        for k in range(max_digits, 0, -1):
            e[k] += e[k - 1] * n
    return len(DIRECTIONS) * sum(math.factorial(k) * e[k] for k in range(min_digits, max_digits + 1))


def sample_clip(rng: np.random.Generator, by_label: dict[int, list[int]], max_digits: int,
                min_digits: int = 1) -> tuple[list[int], list[int], str]:
    """(labels, package indices, direction) of a random clip; the labels are distinct."""
    k = int(rng.integers(min_digits, max_digits + 1))
    labels = [int(x) for x in rng.choice(10, size=k, replace=False)]
    idxs = [by_label[lab][int(rng.integers(len(by_label[lab])))] for lab in labels]
    direction = DIRECTIONS[int(rng.integers(4))]
    return labels, idxs, direction


@register_corpus("video")
def build(ctx: BuildContext) -> CorpusResult:
    from mllm.media import Video, save_video

    cfg = ctx.cfg.video
    info = sources.source_info("mnist")
    mnist = load_mnist()
    out = ctx.output("video")
    counts = {s: ctx.cap(cfg.clips.get(s)) for s in SPLITS}
    bar = ctx.bar(sum(counts.values()), "video")
    with out:
        for split in SPLITS:
            rng = ctx.rng("video", split)
            pool = by_label(split_pool(ctx.cfg.digits.fractions, split))
            if counts[split] and (missing := [lab for lab in range(10) if not pool.get(lab)]):
                raise ValueError(f"video.clips.{split}: the {split} digits (digits.fractions) have no image of "
                                 f"{', '.join(map(str, missing))}, which its clips draw from")
            if counts[split] > (most := distinct_clips(pool, cfg.max_digits)):
                raise ValueError(f"video.clips.{split} {counts[split]}: the {split} digits (digits.fractions) make "
                                 f"only {most} different clips")
            seen = set()
            k = 0
            while k < counts[split]:
                labels, idxs, direction = sample_clip(rng, pool, cfg.max_digits)
                key = (tuple(labels), tuple(idxs), direction)
                if key in seen:
                    continue
                seen.add(key)
                frames = render_clip([mnist[lab][i] for lab, i in zip(labels, idxs)], direction, rng,
                                     frames=cfg.frames, size=cfg.size, digit_size=cfg.digit_size)
                path, rel = out.media(split, f"{k:06d}.mp4")
                k += 1
                save_video(Video(frames, cfg.fps), path)
                vid = media_part("video", rel)
                plural = len(labels) > 1
                what = f"the digits {digits_phrase(labels)}" if plural else f"the digit {labels[0]}"
                base = {"digits": labels, "direction": direction, "source_indices": idxs,
                        "num_digits": len(labels)}
                gen_p = GEN_PROMPTS[int(rng.integers(len(GEN_PROMPTS)))].format(what=what, d=direction)
                if "video_qa" in cfg.tasks:
                    out.add(split, "video_qa", [user(vid, text(DIGITS_QUESTION)), assistant(text(digits_phrase(labels)))],
                            {**base, "question": DIGITS_QUESTION, "answer": digits_phrase(labels), "question_type": "digits"})
                    q2 = f"Which way do{'' if plural else 'es'} the digit{'s' if plural else ''} move?"
                    q2 += " Answer left, right, up or down."
                    out.add(split, "video_qa", [user(vid, text(q2)), assistant(text(direction))],
                            {**base, "question": q2, "answer": direction, "question_type": "direction",
                             "choices": list(DIRECTIONS)})
                if "video_lane_qa" in cfg.tasks:
                    for q, a in lane_questions(labels, direction):
                        out.add(split, "video_lane_qa", [user(vid, text(q)), assistant(text(a))],
                                {**base, "question": q, "answer": a, "question_type": "lane"})
                if "video_caption" in cfg.tasks:
                    cap = describe(labels, direction)
                    out.add(split, "video_caption", [user(vid, text("Describe the video.")), assistant(text(cap))],
                            {**base, "caption": cap})
                if "video_generation" in cfg.tasks:
                    out.add(split, "video_generation", [user(text(gen_p)), assistant(vid)], {**base, "prompt": gen_p})
                bar.update(1)
    bar.close()
    return CorpusResult(
        name="video", sources=[info], counts=dict(out.counts), tasks=out.tasks,
        extra={"clips": counts, "frames": cfg.frames, "size": cfg.size, "fps": cfg.fps,
               "split_rule": "each split draws digits from the same MNIST split"},
    )
