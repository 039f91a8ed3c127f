"""Interleaved samples: several turns mixing media in and out ("show me a 3, then say it").

Each sample follows one template. Images, clips and speech come from the same
split's sources as the single-modality corpora: MNIST digits of that split,
espeak voices of that split (test: held-out voices only), digit strings of
that split.
"""

from __future__ import annotations

import numpy as np

from mllm.data import sources
from mllm.data.corpora import (
    DIGIT_WORDS, DIRECTIONS, SPLITS, BuildContext, CorpusResult, assistant, media_part, register_corpus, text,
    a_digit, user,
)
from mllm.data.corpora.digits import digit_rgb, load_mnist, split_pool
from mllm.data.corpora.speech import TextSampler, check_voices, digit_words, number_words, sample_voice, synthesize
from mllm.data.corpora.video import by_label, describe, render_clip

TEMPLATES = (
    "show_then_say",  # text -> image + speech
    "read_and_say",  # image -> text + speech
    "hear_and_draw",  # speech -> image
    "video_then_say",  # video -> text, then -> speech (two turns)
    "add_and_say",  # two images -> text + speech
    "number_then_show",  # speech (digit string) -> text + image
    "draw_then_animate",  # text -> image, then -> video (two turns)
    "read_then_draw",  # image -> text + speech, then text -> image (two turns)
)


class _Sample:
    """Collects the media files of one sample; named `<k>_<j>.<ext>`."""

    def __init__(self, ctx: BuildContext, out, split: str, k: int, binary: str):
        self.ctx, self.out, self.split, self.k, self.binary = ctx, out, split, k, binary
        self.j = 0
        self.voices: list[dict] = []

    def _path(self, ext: str):
        path, rel = self.out.media(self.split, f"{self.k:06d}_{self.j}.{ext}")
        self.j += 1
        return path, rel

    def image(self, label: int, index: int) -> dict:
        from mllm.media import Image, save_image

        path, rel = self._path("png")
        save_image(Image(digit_rgb(label, index, self.ctx.cfg.digits.image_size)), path)
        return media_part("image", rel)

    def speech(self, words: str, rng: np.random.Generator) -> dict:
        from mllm.media import save_audio

        voice = sample_voice(rng, self.ctx.cfg.voices, self.split)
        path, rel = self._path("wav")
        save_audio(synthesize(words, voice, self.ctx.cfg.sample_rate, self.binary), path)
        self.voices.append({"transcript": words, **voice.meta()})
        return media_part("audio", rel)

    def video(self, gray: list[np.ndarray], direction: str, rng: np.random.Generator) -> dict:
        from mllm.media import Video, save_video

        vc = self.ctx.cfg.video
        frames = render_clip(gray, direction, rng, frames=vc.frames, size=vc.size, digit_size=vc.digit_size)
        path, rel = self._path("mp4")
        save_video(Video(frames, vc.fps), path)
        return media_part("video", rel)


def _make(template: str, s: _Sample, rng: np.random.Generator, pool: dict[int, list[int]],
          sampler: TextSampler) -> tuple[list[dict], dict]:
    mnist = load_mnist()

    def pick(label: int | None = None) -> tuple[int, int]:
        lab = int(rng.integers(10)) if label is None else label
        return lab, pool[lab][int(rng.integers(len(pool[lab])))]

    if template == "show_then_say":
        d, i = pick()
        msgs = [user(text(f"Show me {a_digit(d)}, then say it.")),
                assistant(s.image(d, i), s.speech(DIGIT_WORDS[d], rng))]
        return msgs, {"digits": [d], "source_indices": [i]}
    if template == "read_and_say":
        d, i = pick()
        msgs = [user(s.image(d, i), text("What digit is this? Say it out loud.")),
                assistant(text(str(d)), s.speech(DIGIT_WORDS[d], rng))]
        return msgs, {"digits": [d], "source_indices": [i]}
    if template == "hear_and_draw":
        d, i = pick()
        msgs = [user(s.speech(DIGIT_WORDS[d], rng), text("Draw the digit you hear.")),
                assistant(s.image(d, i))]
        return msgs, {"digits": [d], "source_indices": [i]}
    if template == "video_then_say":
        d, i = pick()
        direction = DIRECTIONS[int(rng.integers(4))]
        msgs = [user(s.video([mnist[d][i]], direction, rng), text("Which digit moves, and which way?")),
                assistant(text(describe([d], direction))),
                user(text("Now say the digit.")),
                assistant(s.speech(DIGIT_WORDS[d], rng))]
        return msgs, {"digits": [d], "source_indices": [i], "direction": direction}
    if template == "add_and_say":
        (a, ia), (b, ib) = pick(), pick()
        total = a + b
        msgs = [user(s.image(a, ia), s.image(b, ib), text("Add these two digits. Write the sum, then say it.")),
                assistant(text(f"{a} + {b} = {total}"), s.speech(number_words(total), rng))]
        return msgs, {"digits": [a, b], "source_indices": [ia, ib], "answer": str(total)}
    if template == "number_then_show":
        number = sampler.digit_string(rng)
        while len(number) < 2:
            number = sampler.digit_string(rng)
        d, i = pick(int(number[0]))
        msgs = [user(s.speech(digit_words(number), rng), text("Write the number you hear, then show its first digit.")),
                assistant(text(number), s.image(d, i))]
        return msgs, {"digits": [d], "source_indices": [i], "answer": number}
    if template == "draw_then_animate":
        d, i = pick()
        direction = DIRECTIONS[int(rng.integers(4))]
        msgs = [user(text(f"Draw {a_digit(d)}.")),
                assistant(s.image(d, i)),
                user(text(f"Now make it move {direction}.")),
                assistant(s.video([mnist[d][i]], direction, rng))]
        return msgs, {"digits": [d], "source_indices": [i], "direction": direction}
    if template == "read_then_draw":  # ~250 tokens: a third medium would not fit the default model's 256
        (d, i), (e, j) = pick(), pick()
        msgs = [user(s.image(d, i), text("What digit is this? Say it out loud.")),
                assistant(text(str(d)), s.speech(DIGIT_WORDS[d], rng)),
                user(text(f"Now draw {a_digit(e)}.")),
                assistant(s.image(e, j))]
        return msgs, {"digits": [d, e], "source_indices": [i, j], "drawn": [e]}
    raise ValueError(f"unknown interleaved template {template!r}")


@register_corpus("interleaved")
def build(ctx: BuildContext) -> CorpusResult:
    cfg = ctx.cfg.interleaved
    infos = [sources.source_info("mnist"), sources.source_info("espeak")]
    binary = sources.espeak_binary()
    check_voices(ctx.cfg.voices, binary)
    out = ctx.output("interleaved")
    counts = {s: ctx.cap(cfg.samples.get(s)) for s in SPLITS}
    bar = ctx.bar(sum(counts.values()), "interleaved")
    templates: dict[str, int] = {}
    with out:
        for split in SPLITS:
            rng = ctx.rng("interleaved", split)
            pool = by_label(split_pool(ctx.cfg.digits.fractions, split))
            sampler = TextSampler(ctx.cfg.speech, split)
            for k in range(counts[split]):
                template = TEMPLATES[k % len(TEMPLATES)]
                sample = _Sample(ctx, out, split, k, binary)
                messages, meta = _make(template, sample, rng, pool, sampler)
                meta = {"template": template, **meta, "speech": sample.voices}
                out.add(split, "interleaved", messages, meta)
                templates[template] = templates.get(template, 0) + 1
                bar.update(1)
    bar.close()
    return CorpusResult(name="interleaved", sources=infos, counts=dict(out.counts), tasks=out.tasks,
                        extra={"templates": templates})
