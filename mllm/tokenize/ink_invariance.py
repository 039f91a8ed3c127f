"""Recipes `image_ink_invariance` and `video_ink_invariance`: teach a trained tokenizer to read any ink on any paper.

An LM learns to read the tokens its image tokenizer writes for the training images: MNIST's white strokes on
black. A user's scan is dark ink on light paper, and the same tokenizer writes other tokens for it, which the LM
has never seen (the embedded default answered 12 % of inverted test digits, against 99 %). Retraining the LM on
recoloured images would cost a whole build; instead a copy of the tokenizer (the student) learns to write, for
each training image redrawn in a random ink on a random paper (`mllm.augment.recolour`) and, with `frame`, moved
as a digit sits in a box of a form (`mllm.augment.jitter`: smaller, off centre), the original tokenizer's (the
teacher's) tokens of the image as it was. The originals and the colour pictures (which `recolour` leaves
alone) keep their teacher's tokens, so every LM trained on the teacher reads the student's tokens as before, and
the teacher's de-tokenizer still decodes them.

    mllm tokenize train tokenizers/image_ink_invariance_tiny.yaml --out runs/image_ink teacher=runs/image_captioned
    mllm tokenize eval runs/image_ink --report runs/image_ink/report

Recipe `video_ink_invariance` does the same for a video tokenizer: every frame of a clip in one ink on one paper
(`mllm.augment.recolour_clips`), with `frame` the whole clip under one map (`mllm.augment.jitter_clips`:
smaller digits, off centre), and with `tempo` slowed down (`mllm.augment.retime_clips`), as clips from another
renderer may come.

    mllm tokenize train tokenizers/video_ink_invariance_tiny.yaml --out runs/video_ink teacher=runs/video_captioned

The output directory is a trained tokenizer like any other: `media_tokenizer/` (the student) and `detokenizer/`
(the teacher's, copied).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mllm.augment import (
    AffineJitter, Recolour, Retime, is_grayscale, jitter, jitter_clips, recolour, recolour_clips, retime_clips,
)
from mllm.config import ConfigError
from mllm.detokenizers.base import load_detokenizer
from mllm.judges import DigitJudge
from mllm.media import Image, Video, load_image, load_video
from mllm.plots import save_frame_strips, save_image_grid
from mllm.tokenize.corpus_media import evenly_spaced, indexed_batches
from mllm.tokenize.image_recipes import GRID_COLUMNS, ImageData, digit_reader, eval_set, train_images
from mllm.tokenize.recipes import RECIPE_FILE, Recipe, load_recipe, register_recipe
from mllm.tokenize.trainer import EvalConfig, OptimConfig, fit, training_metrics
from mllm.tokenize.video_recipes import (
    ClipSet, VideoData, corpus_judge, judge_scores, train_clips, video_eval,
)
from mllm.tokenize.video_recipes import eval_set as clip_eval_set
from mllm.tokenizers.base import MediaTokenizer, load_media_tokenizer
from mllm.tokenizers.fsq_image import image_batch
from mllm.tokenizers.video_divot import clip_batch


JUDGED = 200  # test digits or clips (at most) drawn back by the de-tokenizer for the judge
SHOWN_CLIPS = 4  # clips in the video ink_invariance.png, each as every input row and every drawn-back row


@dataclass
class InkInvarianceConfig:
    modality: ClassVar[str] = "image"
    teacher: str = ""  # a trained continuous image tokenizer's directory (`mllm tokenize train --out`)
    recolour: Recolour = field(default_factory=lambda: Recolour(prob=0.9))  # of the student's inputs
    frame: AffineJitter = field(default_factory=AffineJitter)  # of the student's inputs, after recolouring
    data: ImageData = field(default_factory=lambda: ImageData(corpora=["digits", "stamps"]))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=1000, batch_size=32, lr=1e-3, warmup_steps=20))
    evaluation: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class VideoInkInvarianceConfig:
    modality: ClassVar[str] = "video"
    teacher: str = ""  # a trained continuous video tokenizer's directory (`mllm tokenize train --out`)
    recolour: Recolour = field(default_factory=lambda: Recolour(prob=0.9))  # one ink and paper per clip
    frame: AffineJitter = field(default_factory=AffineJitter)  # one map per clip, after recolouring
    tempo: Retime = field(default_factory=Retime)  # slowed down, after framing
    data: VideoData = field(default_factory=VideoData)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=1000, batch_size=32, lr=1e-3, warmup_steps=20))
    evaluation: EvalConfig = field(default_factory=video_eval)


class InkInvariance(nn.Module):
    """The student's tokens of a perturbed medium (`perturb`: recoloured, maybe moved) regress onto the frozen
    teacher's of the original (MSE). `pixels` turns a batch of media into the tokenizers' input tensor."""

    def __init__(self, student: MediaTokenizer, teacher: MediaTokenizer, pixels: Callable[[list], torch.Tensor],
                 perturb: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.student, self.teacher = student, teacher.requires_grad_(False)
        self.pixels, self.perturb = pixels, perturb
        # training medium's index -> the teacher's tokens [N, D] of it. The teacher is frozen and sees only
        # originals, so each medium's targets are computed once, in a full batch, not again every epoch (a fifth
        # of a step's time for clips). A medium's features do not depend on its batch-mates at one batch size
        # here: the image and video recipes trained the same bits with this cache as without it.
        self.targets: dict[int, torch.Tensor] = {}

    def train(self, mode: bool = True) -> "InkInvariance":
        super().train(mode)
        self.teacher.eval()  # the targets stay the tokens the LM learnt to read
        return self

    def training_losses(self, batch: tuple[list[int], list]) -> dict[str, torch.Tensor]:
        indices, media = batch
        pixels = self.pixels(media)  # [B, 3, S, S] or [B, T, 3, S, S]
        if all(j in self.targets for j in indices):
            target = torch.stack([self.targets[j] for j in indices])  # [B, N, D]
        else:  # the whole batch, as uncached: the same batch size, so the same bits for the ones already cached
            with torch.no_grad():
                target = self.teacher.features(pixels)
            self.targets.update(zip(indices, target))
        return {"loss": F.mse_loss(self.student.features(self.perturb(pixels)), target)}


def teacher_dir(cfg: InkInvarianceConfig | VideoInkInvarianceConfig) -> Path:
    path, modality = Path(cfg.teacher), cfg.modality
    if not cfg.teacher or not (path / "media_tokenizer").is_dir() or not (path / "detokenizer").is_dir():
        raise ConfigError("teacher", f"must be a trained {modality} tokenizer directory (with media_tokenizer/ and "
                          f"detokenizer/), got {cfg.teacher!r}; set it with teacher=DIR", f"{modality}_ink_invariance")
    return path


def load_teacher(cfg: InkInvarianceConfig | VideoInkInvarianceConfig) -> MediaTokenizer:
    source, modality = teacher_dir(cfg), cfg.modality
    teacher = load_media_tokenizer(source / "media_tokenizer")
    if teacher.modality != modality or teacher.kind != "continuous":
        raise ConfigError("teacher", f"{source} holds a {teacher.kind} {teacher.modality} tokenizer; need a continuous "
                          f"{modality} one", f"{modality}_ink_invariance")
    return teacher


def train_ink_invariance(cfg: InkInvarianceConfig | VideoInkInvarianceConfig, corpora: Path, out: Path) -> dict:
    torch.manual_seed(cfg.optim.seed)
    teacher, source = load_teacher(cfg), teacher_dir(cfg)
    student = load_media_tokenizer(source / "media_tokenizer")
    clock, o = (time.perf_counter(), time.process_time()), cfg.optim
    if cfg.modality == "video":
        module = InkInvariance(student, teacher, partial(clip_batch, frames=teacher.config.frames,
                                                         size=teacher.frame_size, who="train"),
                               lambda clips: retime_clips(jitter_clips(recolour_clips(clips, cfg.recolour), cfg.frame),
                                                          cfg.tempo))
        batches = indexed_batches(train_clips(corpora, cfg.data), o.batch_size, o.seed, cfg.data.cache_clips, load_video)
    else:  # as a user's scan comes: any ink, anywhere in the frame
        module = InkInvariance(student, teacher, partial(image_batch, size=teacher.image_size, who="train"),
                               lambda pixels: jitter(recolour(pixels, cfg.recolour), cfg.frame))
        batches = indexed_batches(train_images(corpora, cfg.data), o.batch_size, o.seed, cfg.data.cache_images,
                                  load_image)
    history = fit(module, batches, o, desc=f"{cfg.modality}_ink_invariance", parameters=list(student.parameters()))
    student.eval().save_pretrained(out / "media_tokenizer")
    shutil.rmtree(out / "detokenizer", ignore_errors=True)
    shutil.copytree(source / "detokenizer", out / "detokenizer")
    return training_metrics(out, {"token_mse": history["loss"]}, len(history["loss"]), clock,
                            {"tokenizer": student}, f"{cfg.modality}_ink_invariance")


# ---------------------------------------------------------------- evaluate


@torch.no_grad()
def tokens(tokenizer: MediaTokenizer, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """pixels [B, 3, S, S] (or clips [B, T, 3, S, S]) -> tokens [B, N, D], in batches."""
    return torch.cat([tokenizer.features(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])


def readings_of(teacher: MediaTokenizer, student: MediaTokenizer, originals: torch.Tensor,
                changed: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    """The teacher's and the student's tokens of each changed version of the originals (`{who}_{kind}`), and the
    student's of the originals: what the evaluations compare with the teacher's tokens of the originals."""
    readings = {f"{who}_{kind}": tokens(tokenizer, pixels, batch_size) for kind, pixels in changed.items()
                for who, tokenizer in (("teacher", teacher), ("student", student))}
    return readings | {"student_originals": tokens(student, originals, batch_size)}


def input_rows(originals: torch.Tensor, changed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The picture's input rows by title: the originals, then each changed version (all recoloured first)."""
    return {"original": originals} | {kind if kind == "recoloured" else f"recoloured, {kind}": pixels
                                      for kind, pixels in changed.items()}


def evaluate_ink_invariance(trained: Path, corpora: Path, report: Path, limit: int | None, split: str) -> dict:
    """On the split's images and the same images recoloured (every grayscale one, seeded), and recoloured and moved
    when the recipe moves them (`frame`): how far the student's tokens are from the teacher's of the originals,
    before (the teacher's own) and after; a linear digit reader fit on the teacher's mean tokens of the train
    digits, read on each; the judge on what the de-tokenizer draws back from the teacher's tokens of the originals
    (what it can do at best), from both readings of the recolourings and from the student's of the moved ones, for
    `JUDGED` digits evenly spaced; and a grid of what went in and what was drawn back."""
    _, cfg = load_recipe(trained / RECIPE_FILE)
    student, teacher = load_media_tokenizer(trained / "media_tokenizer"), load_teacher(cfg)
    detokenizer = load_detokenizer(trained / "detokenizer")
    test, e = eval_set(corpora, cfg.data, limit, split), cfg.evaluation
    pixels = image_batch(test.images, student.image_size, "eval")
    generator = torch.Generator().manual_seed(e.seed)
    changed = {"recoloured": recolour(pixels, Recolour(prob=1.0, min_contrast=cfg.recolour.min_contrast), generator)}
    if cfg.frame.enabled:  # every recolouring moved too, as the student learnt to read them
        changed["moved"] = jitter(changed["recoloured"], replace(cfg.frame, prob=1.0), generator)
    target = tokens(teacher, pixels, e.batch_size)
    readings = readings_of(teacher, student, pixels, changed, e.batch_size)
    grayscale = is_grayscale(pixels)
    gray, colour = grayscale.nonzero()[:, 0].tolist(), (~grayscale).nonzero()[:, 0].tolist()
    metrics: dict = {"images": len(pixels), "grayscale_images": len(gray)}
    for name, got in readings.items():
        for part, rows in (("grayscale", gray), ("colour", colour)):
            if rows and not (part == "colour" and name.endswith("recoloured")):  # recolouring leaves colour alone
                metrics[f"token_mse_{name}_{part}"] = round(F.mse_loss(got[rows], target[rows]).item(), 5)
    digits = [i for i, label in enumerate(test.labels) if label is not None]
    if digits:
        read = digit_reader(teacher, corpora, e.batch_size)
        y = torch.tensor([test.labels[i] for i in digits])
        for name, got in {"teacher_originals": target, **readings}.items():
            metrics[f"digit_probe_{name}"] = round(float((read(got[digits].mean(1)) == y).float().mean()), 4)
        judge, judged = DigitJudge.load_or_train(corpora), digits[::-(-len(digits) // JUDGED)]  # evenly spaced
        decoded = {"teacher_originals": target} | {name: readings[name] for name in
                                                   ("teacher_recoloured", "student_recoloured", "student_moved")
                                                   if name in readings}
        drawn = {name: detokenizer.decode_batch(got[judged], guidance=e.guidance, steps=e.steps, generator=generator)
                 for name, got in decoded.items()}
        for name, images in drawn.items():
            metrics[f"judge_drawn_from_{name}"] = round(judge.accuracy(images, [test.labels[i] for i in judged]), 4)
        shown = range(0, len(judged), -(-len(judged) // (2 * GRID_COLUMNS)))  # of `judged`: every digit shows
        inputs = input_rows(pixels, changed)
        rows = [*([Image.from_tensor(x[judged[i]]) for i in shown] for x in inputs.values()),
                *([drawn[name][i] for i in shown] for name in drawn)]
        save_image_grid(rows, report / "ink_invariance.png", row_titles=[
            *inputs, *(f"drawn: {name.replace('_', ', ')}" for name in drawn)])
    return metrics


def evaluate_video_ink_invariance(trained: Path, corpora: Path, report: Path, limit: int | None, split: str) -> dict:
    """On the split's clips and the same clips recoloured (every grayscale one, seeded), and recoloured and moved
    or slowed when the recipe moves (`frame`) or slows (`tempo`) them: how far the student's and the teacher's tokens of each are from the
    teacher's tokens of the originals, and the student's of the originals; the video judge on what the
    de-tokenizer draws back from the teacher's tokens of the originals (what it can do at best) and from each
    reading of the changed clips, for `JUDGED` clips evenly spaced; and frame strips of what went in and what was
    drawn back."""
    _, cfg = load_recipe(trained / RECIPE_FILE)
    student, teacher = load_media_tokenizer(trained / "media_tokenizer"), load_teacher(cfg)
    detokenizer = load_detokenizer(trained / "detokenizer")
    test, e = clip_eval_set(corpora, cfg.data, limit, split), cfg.evaluation
    pixels = clip_batch(test.videos, teacher.config.frames, teacher.frame_size, "eval")  # [B, T, 3, S, S]
    generator = torch.Generator().manual_seed(e.seed)
    recoloured = recolour_clips(pixels, Recolour(prob=1.0, min_contrast=cfg.recolour.min_contrast), generator)
    changed = {"recoloured": recoloured}
    if cfg.frame.enabled:  # every recolouring moved too, as the student learnt to read them
        changed["moved"] = jitter_clips(recoloured, replace(cfg.frame, prob=1.0), generator)
    if cfg.tempo.enabled:  # and slowed down
        changed["slowed"] = retime_clips(recoloured, replace(cfg.tempo, prob=1.0), generator)
    target = tokens(teacher, pixels, e.batch_size)
    readings = readings_of(teacher, student, pixels, changed, e.batch_size)
    metrics: dict = {"clips": len(pixels)}
    for name, got in readings.items():
        metrics[f"token_mse_{name}"] = round(F.mse_loss(got, target).item(), 5)

    judged = evenly_spaced(len(pixels), JUDGED)
    subset = ClipSet(*([column[i] for i in judged] for column in (test.videos, test.digits, test.directions)))
    decoded = {"teacher_originals": target} | {k: got for k, got in readings.items() if k != "student_originals"}
    fps = detokenizer.config.fps
    drawn = {name: [clip for i in range(0, len(judged), e.batch_size) for clip in detokenizer.decode_batch(
        got[judged[i:i + e.batch_size]], guidance=e.guidance, steps=e.steps, generator=generator)]
        for name, got in decoded.items()}
    judge = corpus_judge(corpora)
    for name, clips in drawn.items():
        metrics |= judge_scores(subset, clips, judge, f"drawn_from_{name}")
    shown = range(min(SHOWN_CLIPS, len(judged)))
    inputs = input_rows(pixels, changed)
    rows = [[Video.from_tensor(x[judged[i]], fps) for x in inputs.values()] + [drawn[name][i] for name in drawn]
            for i in shown]
    titles = [*inputs, *(f"drawn: {name.replace('_', ', ')}" for name in drawn)]
    save_frame_strips([clip for row in rows for clip in row], report / "ink_invariance.png", titles * len(rows))
    return metrics


register_recipe(Recipe("image_ink_invariance", InkInvarianceConfig, train_ink_invariance, evaluate_ink_invariance))
register_recipe(Recipe("video_ink_invariance", VideoInkInvarianceConfig, train_ink_invariance,
                       evaluate_video_ink_invariance))
