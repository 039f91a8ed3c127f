"""Video tokenizer recipes: train a Divot-style tokenizer with its de-tokenizer, then evaluate the pair.

    video_divot  video_divot (continuous tokens) + diffusion_video    1. tokens through a frame decoder
                                                                         (vq_video's): MSE; thrown away, or
                                                                         with `refine` the de-tokenizer's prior
                                                                      2. de-tokenizer on the tokens: diffusion
                                                                         loss (with `joint`, the tokenizer
                                                                         trains through it too: Divot's objective)
    video_fsq    video_divot_fsq (FSQ codes)     + vq_video decoder   trained jointly: MSE

Training reads the distinct clips of the train split of `data.corpora`
(built corpora, `mllm data build`), a shuffled batch at a time, and writes
media_tokenizer/, detokenizer/, loss.png and metrics. Evaluation
reconstructs the test (or validation) split (encode, then decode; `limit` keeps an evenly
spaced subset) and reports PSNR over the sampled frames, the video judge's
digit and direction accuracy on the originals and on the reconstructions
(clips with `digits`/`direction` metadata), codebook use (discrete), and
`frame_strips.png`: each original clip's frames above its reconstruction's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mllm.detokenizers.base import load_detokenizer
from mllm.detokenizers.diffusion import DiffusionConfig
from mllm.detokenizers.diffusion_image import DiTArch
from mllm.detokenizers.diffusion_video import DiffusionVideoConfig, DiffusionVideoDeTokenizer
from mllm.detokenizers.vq_image import PixelDecoderArch
from mllm.detokenizers.vq_video import FramesDecoder, VQVideoDecoder, VQVideoDecoderConfig, frames_decoder_arch
from mllm.judges.video import VideoJudge
from mllm.media import Video, load_video
from mllm.plots import save_frame_strips
from mllm.tokenize.captions import CaptionReader, CaptionVocabulary, CaptionWords, captioned_batches
from mllm.tokenize.corpus_media import corpus_media, evenly_spaced, shuffled_batches
from mllm.tokenize.metrics import codebook_usage, psnr_db
from mllm.tokenize.recipes import RECIPE_FILE, Recipe, load_recipe, register_recipe
from mllm.tokenize.trainer import EvalConfig, OptimConfig, fit, training_metrics
from mllm.tokenizers.base import load_media_tokenizer
from mllm.tokenizers.video_divot import VideoDivotConfig, VideoDivotTokenizer, clip_batch, sample_frames
from mllm.tokenizers.video_divot_fsq import VideoDivotFSQConfig, VideoDivotFSQTokenizer

STRIP_CLIPS = 8  # clips shown in frame_strips.png


# ---------------------------------------------------------------- configs


@dataclass
class VideoData:
    corpora: list[str] = field(default_factory=lambda: ["video"])  # names under --data, or absolute directories
    max_clips: int | None = None  # cap on distinct training clips (None: all)
    cache_clips: int = 20_000  # decoded clips kept in memory after their first load


def video_eval() -> EvalConfig:
    return EvalConfig(batch_size=50)


@dataclass
class TokenPretraining(CaptionWords):
    """Stage 1 of video_divot: tokens learn to keep what the frames need, through a frame decoder (MSE).

    With `caption_words` > 0 the mean token must also predict the words of the clip's training captions ("The
    digits 3 and 8 move left."; mllm/tokenize/captions.py): reconstruction alone keeps where the strokes are in
    each frame, not which digits they make, and an LM reads those digits at chance.
    """

    decoder: PixelDecoderArch = field(default_factory=frames_decoder_arch)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class DivotRecipeConfig:
    tokenizer: VideoDivotConfig = field(default_factory=VideoDivotConfig)
    pretraining: TokenPretraining = field(default_factory=TokenPretraining)  # optim.steps 0: no stage 1
    joint: bool = False  # stage 2 also trains the tokenizer through the diffusion loss (Divot's objective)
    refine: bool = False  # the de-tokenizer keeps the stage-1 decoder as its prior and refines its frames
    image_size: int = 32  # the de-tokenizer's frame size
    fps: float = 4.0  # the decoded clips' frame rate
    dit: DiTArch = field(default_factory=DiTArch)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: VideoData = field(default_factory=VideoData)
    optim: OptimConfig = field(default_factory=OptimConfig)  # stage 2
    evaluation: EvalConfig = field(default_factory=video_eval)


@dataclass
class FSQVideoRecipeConfig:
    tokenizer: VideoDivotFSQConfig = field(default_factory=VideoDivotFSQConfig)
    decoder: PixelDecoderArch = field(default_factory=frames_decoder_arch)
    fps: float = 4.0
    data: VideoData = field(default_factory=VideoData)
    optim: OptimConfig = field(default_factory=OptimConfig)
    evaluation: EvalConfig = field(default_factory=video_eval)


# ---------------------------------------------------------------- data


def corpus_clips(corpora_dir: Path, corpus: str, split: str) -> tuple[list[Path], list[dict]]:
    """The distinct video files a corpus' split refers to, in record order, and the meta of each one's first record."""
    clips = corpus_media(corpora_dir, corpus, split, "video")
    return list(clips), list(clips.values())


def train_clips(corpora_dir: Path, data: VideoData) -> list[Path]:
    paths = [p for corpus in data.corpora for p in corpus_clips(corpora_dir, corpus, "train")[0]]
    if not paths:
        raise ValueError(f"no training clips in {data.corpora} under {corpora_dir}")
    return paths[: data.max_clips]


def clip_batches(paths: list[Path], batch_size: int, seed: int, cache_clips: int,
                 cache: dict[int, Video] | None = None) -> Iterator[list[Video]]:
    """Endless shuffled epochs of `batch_size` clips; the first `cache_clips` distinct ones stay decoded in memory
    (in `cache`, shared by the stages of one recipe, when given)."""
    return shuffled_batches(paths, batch_size, seed, cache_clips, load_video, cache)


@dataclass
class ClipSet:
    videos: list[Video]
    digits: list[list[int] | None]  # the digits each clip shows, where the corpus says
    directions: list[str | None]


def eval_set(corpora_dir: Path, data: VideoData, limit: int | None, split: str) -> ClipSet:
    paths, metas = [], []
    for corpus in data.corpora:
        p, m = corpus_clips(corpora_dir, corpus, split)
        paths += p
        metas += m
    keep = evenly_spaced(len(paths), limit)
    paths, metas = [paths[i] for i in keep], [metas[i] for i in keep]
    return ClipSet([load_video(p) for p in tqdm(paths, desc=f"load {split} clips")],
                   [m.get("digits") for m in metas], [m.get("direction") for m in metas])


def empty_clip(frames: int, size: int, fps: float) -> Video:
    """The all-black clip: the diffusion de-tokenizer's unconditional branch."""
    return Video(np.zeros((frames, size, size, 3), dtype=np.uint8), fps)


# ---------------------------------------------------------------- training modules


class TokenAutoencoder(nn.Module):
    """Stage 1 of video_divot: the tokenizer and a frame decoder, trained on MSE; with a vocabulary, also a
    throwaway linear reader of caption words from the mean token."""

    def __init__(self, tokenizer: VideoDivotTokenizer, decoder: FramesDecoder, vocabulary: int = 0,
                 words_weight: float = 0.0):
        super().__init__()
        self.tokenizer, self.decoder = tokenizer, decoder
        self.captions = CaptionReader(tokenizer.feature_dim, vocabulary, words_weight)

    def training_losses(self, batch: tuple[list[Video], torch.Tensor | None]) -> dict[str, torch.Tensor]:
        videos, words = batch  # words: [B, V] caption word targets, or None
        clips = clip_batch(videos, self.tokenizer.config.frames, self.tokenizer.frame_size, "train")
        tokens = self.tokenizer.features(clips)  # [B, N, D]
        return self.captions.add_loss({"mse": F.mse_loss(self.decoder(tokens), clips)}, tokens, words)


class TokenConditionedDiffusion(nn.Module):
    """Stage 2 of video_divot: the diffusion de-tokenizer on the tokens (and, when `joint`, the tokenizer through it)."""

    def __init__(self, tokenizer: VideoDivotTokenizer, detokenizer: DiffusionVideoDeTokenizer, joint: bool):
        super().__init__()
        self.tokenizer, self.detokenizer, self.joint = tokenizer, detokenizer, joint
        c = tokenizer.config
        self.register_buffer("empty", clip_batch([empty_clip(c.frames, tokenizer.frame_size, 1.0)], c.frames,
                                                 tokenizer.frame_size, "train"), persistent=False)

    def training_losses(self, videos: list[Video]) -> dict[str, torch.Tensor]:
        c, d = self.tokenizer.config, self.detokenizer.config
        clips = clip_batch(videos, c.frames, self.tokenizer.frame_size, "train")
        with torch.set_grad_enabled(self.joint):
            tokens = self.tokenizer.features(clips)  # [B, N, D]
            null = self.tokenizer.features(self.empty)[0] if self.joint else None  # the empty clip's, current
        targets = clips if self.tokenizer.frame_size == d.image_size else clip_batch(videos, d.frames, d.image_size, "train")
        return self.detokenizer.training_losses(targets, tokens, null)


class DiscreteAutoencoder(nn.Module):
    """video_fsq: the FSQ tokenizer and its direct decoder, trained as one autoencoder."""

    def __init__(self, tokenizer: VideoDivotFSQTokenizer, decoder: VQVideoDecoder):
        super().__init__()
        self.tokenizer, self.decoder = tokenizer, decoder

    def training_losses(self, videos: list[Video]) -> dict[str, torch.Tensor]:
        clips = clip_batch(videos, self.tokenizer.config.frames, self.tokenizer.frame_size, "train")
        vectors, _ = self.tokenizer.quantize(clips)
        return {"loss": F.mse_loss(self.decoder.decode_vectors(vectors), clips)}


# ---------------------------------------------------------------- train


def build_divot(cfg: DivotRecipeConfig) -> tuple[VideoDivotTokenizer, DiffusionVideoDeTokenizer]:
    """A fresh continuous tokenizer and the diffusion de-tokenizer conditioned on its tokens."""
    tokenizer = VideoDivotTokenizer(cfg.tokenizer)
    t = tokenizer.config
    detokenizer = DiffusionVideoDeTokenizer(DiffusionVideoConfig(
        frames=t.frames, image_size=cfg.image_size, fps=cfg.fps, num_tokens=t.num_tokens, token_dim=t.feature_dim,
        token_grid=t.query_grid, dit=cfg.dit, diffusion=cfg.diffusion,
        prior=cfg.pretraining.decoder if cfg.refine else None,
    ))
    return tokenizer, detokenizer


def build_fsq(cfg: FSQVideoRecipeConfig) -> tuple[VideoDivotFSQTokenizer, VQVideoDecoder]:
    """A fresh FSQ video tokenizer and the direct decoder that reads its codes."""
    tokenizer = VideoDivotFSQTokenizer(cfg.tokenizer)
    t = tokenizer.config
    decoder = VQVideoDecoder(VQVideoDecoderConfig(
        frames=t.frames, image_size=tokenizer.frame_size, fps=cfg.fps, num_tokens=t.num_tokens,
        codebook_size=tokenizer.codebook_size, code_dim=tokenizer.code_dim, token_grid=t.query_grid, arch=cfg.decoder,
    ))
    return tokenizer, decoder


def train_divot(cfg: DivotRecipeConfig, corpora: Path, out: Path) -> dict:
    """Stage 1 gives the tokens content fast (MSE); stage 2 trains the de-tokenizer conditioned on them."""
    torch.manual_seed(cfg.optim.seed)
    tokenizer, detokenizer = build_divot(cfg)
    t = tokenizer.config
    probe = detokenizer.prior if cfg.refine else FramesDecoder(
        t.frames, tokenizer.frame_size, t.num_tokens, t.feature_dim, cfg.pretraining.decoder,
        None if t.query_grid is None else tuple(t.query_grid))
    paths, pre = train_clips(corpora, cfg.data), cfg.pretraining.optim
    decoded: dict[int, Video] = {}  # both stages read the same clips: decode each once
    clock = (time.perf_counter(), time.process_time())
    if cfg.pretraining.caption_words > 0:
        vocabulary = CaptionVocabulary(corpora, cfg.data.corpora, "video", cfg.pretraining.min_word_count)
        batches = captioned_batches(paths, vocabulary, pre.batch_size, pre.seed, cfg.data.cache_clips, load_video,
                                    decoded)
        stage1_module = TokenAutoencoder(tokenizer, probe, len(vocabulary.words), cfg.pretraining.caption_words)
    else:
        batches = ((videos, None) for videos in clip_batches(paths, pre.batch_size, pre.seed, cfg.data.cache_clips, decoded))
        stage1_module = TokenAutoencoder(tokenizer, probe)
    stage1 = fit(stage1_module, batches, pre, desc="video_divot tokens") if pre.steps else {}
    empty = empty_clip(t.frames, tokenizer.frame_size, cfg.fps)
    detokenizer.set_null_tokens(tokenizer.encode(empty))
    if not cfg.joint:
        tokenizer.requires_grad_(False)  # (a vision tower stays frozen either way)
    stage2_module = TokenConditionedDiffusion(tokenizer, detokenizer, cfg.joint)
    parameters = list(detokenizer.parameters()) + (list(tokenizer.parameters()) if cfg.joint else [])
    stage2 = fit(stage2_module,
                 clip_batches(paths, cfg.optim.batch_size, cfg.optim.seed, cfg.data.cache_clips, decoded),
                 cfg.optim, desc="video_divot de-tokenizer", parameters=parameters)
    tokenizer.eval().requires_grad_(False)
    detokenizer.set_null_tokens(tokenizer.encode(empty))  # again: with `joint`, the tokenizer has moved
    tokenizer.save_pretrained(out / "media_tokenizer")
    detokenizer.eval().save_pretrained(out / "detokenizer")
    terms = (("tokens_mse", stage1.get("mse")), ("tokens_caption_words", stage1.get("caption_words")),
             ("diffusion", stage2.get("diffusion", stage2["loss"])),
             ("prior_mse", stage2.get("prior_mse")))  # prior_mse: on [-1, 1] pixels
    history = {k: v for k, v in terms if v}
    return training_metrics(out, history, pre.steps + cfg.optim.steps, clock,
                   {"tokenizer": tokenizer, "detokenizer": detokenizer}, "video_divot")


def train_fsq(cfg: FSQVideoRecipeConfig, corpora: Path, out: Path) -> dict:
    torch.manual_seed(cfg.optim.seed)
    tokenizer, decoder = build_fsq(cfg)
    batches = clip_batches(train_clips(corpora, cfg.data), cfg.optim.batch_size, cfg.optim.seed, cfg.data.cache_clips)
    clock = (time.perf_counter(), time.process_time())
    history = fit(DiscreteAutoencoder(tokenizer, decoder), batches, cfg.optim, desc=tokenizer.name)
    decoder.set_codebook(tokenizer.codebook)
    tokenizer.eval().save_pretrained(out / "media_tokenizer")
    decoder.eval().save_pretrained(out / "detokenizer")
    return training_metrics(out, history, len(history["loss"]), clock, {"tokenizer": tokenizer, "decoder": decoder},
                   tokenizer.name)


# ---------------------------------------------------------------- evaluate


def psnr(original: Video, reconstruction: Video) -> float:
    """dB over the reconstruction's frames: the original sampled the same way, at the reconstruction's size."""
    return psnr_db(sample_frames(original, reconstruction.num_frames, reconstruction.height), reconstruction.to_tensor())


def sample_frames_video(original: Video, like: Video) -> Video:
    """The original clip's frames the tokenizer sampled, at the reconstruction's size (the strip's top row)."""
    return Video.from_tensor(sample_frames(original, like.num_frames, like.height), original.fps)


def judge_scores(test: ClipSet, clips: list[Video], judge: VideoJudge | None, name: str) -> dict:
    """The video judge's accuracies on `clips` (the test set's or its reconstructions), keys suffixed `_{name}`."""
    judged = [i for i, (d, m) in enumerate(zip(test.digits, test.directions)) if d is not None and m is not None]
    if judge is None or not judged:
        return {}
    scores = judge.scores([clips[i] for i in judged], [test.digits[i] for i in judged],
                          [test.directions[i] for i in judged])
    return {f"{k}_{name}": round(v, 4) for k, v in scores.items()}


def reconstruction_report(test: ClipSet, recons: list[Video], judge: VideoJudge | None, report: Path) -> dict:
    """PSNR, the video judge's accuracies on originals and reconstructions, and the frame strips."""
    metrics: dict[str, Any] = {
        "clips": len(recons),
        "psnr_db": round(float(np.mean([psnr(o, r) for o, r in zip(test.videos, recons)])), 2),
        **judge_scores(test, test.videos, judge, "originals"),
        **judge_scores(test, recons, judge, "reconstructions"),
    }
    shown = range(min(STRIP_CLIPS, len(recons)))
    rows = [clip for i in shown for clip in (sample_frames_video(test.videos[i], recons[i]), recons[i])]
    save_frame_strips(rows, report / "frame_strips.png", ["original", "reconstruction"] * len(shown))
    return metrics


def corpus_judge(corpora: Path) -> VideoJudge | None:
    """The video judge of the built corpora (trained once, then loaded); None without the digits corpus."""
    return VideoJudge.load_or_train(corpora) if (corpora / "digits" / "train.jsonl").is_file() else None


def evaluate_divot(trained: Path, corpora: Path, report: Path, limit: int | None, split: str) -> dict:
    _, cfg = load_recipe(trained / RECIPE_FILE)
    tokenizer, detokenizer = load_media_tokenizer(trained / "media_tokenizer"), load_detokenizer(trained / "detokenizer")
    test, judge = eval_set(corpora, cfg.data, limit, split), corpus_judge(corpora)
    e = cfg.evaluation
    generator = torch.Generator().manual_seed(e.seed)
    recons: list[Video] = []
    priors: list[Video] = []  # the prior's direct decodings, which the DiT refines (a de-tokenizer with a prior)
    start = time.perf_counter()
    for i in tqdm(range(0, len(test.videos), e.batch_size), desc="reconstruct"):
        tokens = tokenizer.encode_batch(test.videos[i:i + e.batch_size])  # [B, N, D]
        recons += detokenizer.decode_batch(tokens, guidance=e.guidance, steps=e.steps, generator=generator)
        if detokenizer.config.prior is not None:
            with torch.no_grad():
                clips = detokenizer.prior(tokens).clamp(0, 1)  # [B, T, 3, S, S]
            priors += [Video.from_tensor(clip, detokenizer.config.fps) for clip in clips]
    seconds = time.perf_counter() - start
    return {
        **reconstruction_report(test, recons, judge, report),
        **({"psnr_db_prior": round(float(np.mean([psnr(o, r) for o, r in zip(test.videos, priors)])), 2),
            **judge_scores(test, priors, judge, "prior")} if priors else {}),
        "tokens_per_clip": tokenizer.num_tokens(test.videos[0]),
        "token_dim": tokenizer.feature_dim,
        "guidance": detokenizer.resolve_guidance(e.guidance),
        "steps": e.steps or detokenizer.config.diffusion.steps,
        "scheduler": detokenizer.config.diffusion.scheduler,
        "reconstruct_clips_per_s": round(len(recons) / seconds, 2),
    }


def evaluate_fsq(trained: Path, corpora: Path, report: Path, limit: int | None, split: str) -> dict:
    _, cfg = load_recipe(trained / RECIPE_FILE)
    tokenizer, decoder = load_media_tokenizer(trained / "media_tokenizer"), load_detokenizer(trained / "detokenizer")
    test, judge = eval_set(corpora, cfg.data, limit, split), corpus_judge(corpora)
    codes, recons = [], []
    start = time.perf_counter()
    for i in tqdm(range(0, len(test.videos), cfg.evaluation.batch_size), desc="reconstruct"):
        batch = tokenizer.encode_batch(test.videos[i:i + cfg.evaluation.batch_size])  # [B, N]
        codes.append(batch)
        recons += decoder.decode_batch(batch)
    seconds = time.perf_counter() - start
    return {
        **reconstruction_report(test, recons, judge, report),
        "tokens_per_clip": tokenizer.num_tokens(test.videos[0]),
        "codebook_size": tokenizer.codebook_size,
        **codebook_usage(codes, tokenizer.codebook_size),
        "reconstruct_clips_per_s": round(len(recons) / seconds, 1),
    }


register_recipe(Recipe("video_divot", DivotRecipeConfig, train_divot, evaluate_divot))
register_recipe(Recipe("video_fsq", FSQVideoRecipeConfig, train_fsq, evaluate_fsq))
