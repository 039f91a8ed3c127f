"""Media tokenizers and de-tokenizers: items/s, the real-time factor of audio, and the cost of a diffusion step.

Every pair is built untrained from its tiny recipe in tokenizers/ (weights do not change the cost):

    image  fsq, query (discrete, VQ decoders), diffusion (continuous, diffusion de-tokenizer)
    video  divot (continuous, diffusion de-tokenizer), fsq (discrete)
    audio  audio_codec (discrete), mel_latent + diffusion_mel (continuous)

Image and video: encode and decode items/s at batch B against batch 1 (the ratio is the gain from
batching). Audio: real-time factor (compute seconds / audio seconds; below 1 is faster than real time)
of one clip. Diffusion de-tokenizers: ms per denoising step, the slope of one decode's time between
S and 2·S steps (S = 4 with --quick, else 25). Every pair's variants are timed alternately.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mllm.bench.report import Figure, rate_figure
from mllm.bench.settings import Settings
from mllm.bench.timing import alternate
from mllm.detokenizers import DeTokenizer
from mllm.detokenizers.audio_codec import CodecDecoder
from mllm.detokenizers.diffusion_mel import MelDiffusionDecoder
from mllm.media import Audio, Image, Video
from mllm.tokenize.image_recipes import build_diffusion, build_discrete
from mllm.tokenize.recipes import load_recipe
from mllm.tokenize.video_recipes import build_divot, build_fsq
from mllm.tokenizers import MediaTokenizer
from mllm.tokenizers.audio_codec import CodecTokenizer
from mllm.tokenizers.fsq_image import FSQImageTokenizer
from mllm.tokenizers.mel_latent import MelLatentTokenizer
from mllm.tokenizers.query_image import QueryImageTokenizer

SECTION = "6. tokenizers"
RECIPES = Path(__file__).resolve().parents[2] / "tokenizers"
Pair = tuple[MediaTokenizer, DeTokenizer]
VISUAL: dict[str, tuple[str, Callable[[object], Pair]]] = {  # tiny recipe, builder of an untrained pair
    "image fsq": ("image_fsq_tiny.yaml", lambda cfg: build_discrete(FSQImageTokenizer, cfg)),
    "image query": ("image_query_tiny.yaml", lambda cfg: build_discrete(QueryImageTokenizer, cfg)),
    "image diffusion": ("image_diffusion_tiny.yaml", build_diffusion),
    "video divot": ("video_divot_tiny.yaml", build_divot),
    "video fsq": ("video_fsq_tiny.yaml", build_fsq),
}
AUDIO: dict[str, tuple[str, Callable[[object], Pair]]] = {
    "audio codec": ("audio_codec_tiny.yaml", lambda c: (CodecTokenizer(c.model), CodecDecoder(c.model))),
    "audio mel diffusion": ("audio_mel_diffusion_tiny.yaml",
                            lambda c: (MelLatentTokenizer(c.model.latents), MelDiffusionDecoder(c.model))),
}


def build(recipes: dict, name: str) -> Pair:
    recipe, builder = recipes[name]
    tokenizer, detokenizer = builder(load_recipe(RECIPES / recipe)[1])
    return tokenizer.eval(), detokenizer.eval()


def media(tokenizer: MediaTokenizer, rng: np.random.Generator) -> Image | Video:
    """A random item of the size the tokenizer reads."""
    if tokenizer.modality == "video":
        size = tokenizer.frame_size
        return Video(rng.integers(0, 256, (tokenizer.config.frames, size, size, 3), dtype=np.uint8), 4.0)
    return Image(rng.integers(0, 256, (tokenizer.image_size, tokenizer.image_size, 3), dtype=np.uint8))


def diffusion_steps(detokenizer: DeTokenizer) -> int | None:
    """The decode steps of a diffusion de-tokenizer (config.diffusion.steps or config.steps); None for others."""
    config = detokenizer.config
    return getattr(getattr(config, "diffusion", config), "steps", None)


def step_figure(name: str, detokenizer: DeTokenizer, tokens: torch.Tensor, steps: int, repeats: int) -> Figure:
    """ms per denoising step of one decode: the slope of decode time between `steps` and 2 · `steps`."""
    decode = {k: (lambda k=k: detokenizer.decode(tokens, steps=k, generator=torch.Generator().manual_seed(0)))
              for k in (steps, 2 * steps)}
    times = alternate(decode, repeats)
    median = (times[2 * steps].median - times[steps].median) / steps * 1e3  # a difference of minima means nothing
    return Figure(SECTION, f"{name}: de-tokenizer time per diffusion step", "ms", median,
                  note=f"slope of one decode's time between {steps} and {2 * steps} steps, no guidance")


def visual(name: str, batch: int, steps: int, repeats: int) -> list[Figure]:
    tokenizer, detokenizer = build(VISUAL, name)
    rng = np.random.default_rng(0)
    items = [media(tokenizer, rng) for _ in range(batch)]
    tokens = tokenizer.encode_batch(items)
    guided = {"guidance": 2.0, "steps": steps} if diffusion_steps(detokenizer) else {}
    times = alternate({
        "encode 1": lambda: tokenizer.encode(items[0]),
        "encode B": lambda: tokenizer.encode_batch(items),
        "decode 1": lambda: detokenizer.decode(tokens[0], **guided),
        "decode B": lambda: detokenizer.decode_batch(tokens, **guided),
    }, repeats)
    label = f"{name} ({tokenizer.name} → {detokenizer.name})"
    figures = [rate_figure(SECTION, f"{label}: {op} at batch {batch}", "items/s", batch, times[f"{op} B"],
                           "batch 1", times[f"{op} 1"], baseline_work=1) for op in ("encode", "decode")]
    if guided:
        figures[1].note = f"{steps} steps (the recipe: {diffusion_steps(detokenizer)}), cfg 2"
        figures.append(step_figure(name, detokenizer, tokens[0], steps, repeats))
    return figures


def speechlike(seconds: float, rate: int = 16000) -> Audio:
    """A voiced buzz (120 Hz harmonics) with a moving formant and syllable-rate amplitude: deterministic."""
    t = np.arange(round(seconds * rate)) / rate
    buzz = sum(np.sin(2 * np.pi * 120 * k * t) / k for k in range(1, 30))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) * (1 + 0.5 * np.sin(2 * np.pi * (500 + 300 * np.sin(t)) * t))
    wave = buzz * envelope
    return Audio((0.3 * wave / np.abs(wave).max())[None].astype(np.float32), rate)


def audio(name: str, seconds: float, steps: int, repeats: int) -> list[Figure]:
    tokenizer, detokenizer = build(AUDIO, name)
    clip = speechlike(seconds)
    tokens = tokenizer.encode(clip)
    times = alternate({
        "encode": lambda: tokenizer.encode(clip),
        "decode": lambda: detokenizer.decode(tokens, generator=torch.Generator().manual_seed(0)),
    }, repeats)
    label = f"{name} ({tokenizer.name} → {detokenizer.name})"
    figures = [Figure(SECTION, f"{label}: {op} real-time factor", "s/s", times[op].median / seconds,
                      times[op].min / seconds, "real time", 1.0, 1.0,
                      note=f"{seconds:g} s of 16 kHz audio, {len(tokens) / seconds:.0f} tokens/s" if op == "encode" else "")
               for op in ("encode", "decode")]
    if diffusion_steps(detokenizer):
        figures.append(step_figure(name, detokenizer, tokens, steps, repeats))
    return figures


def run(s: Settings) -> list[Figure]:
    batch, seconds, steps = s.pick(4, 32), s.pick(2.0, 10.0), s.pick(4, 25)
    figures = []
    with torch.no_grad():
        for name in VISUAL:
            figures += visual(name, batch, steps, s.repeats)
        for name in AUDIO:
            figures += audio(name, seconds, steps, s.repeats)
    return figures
