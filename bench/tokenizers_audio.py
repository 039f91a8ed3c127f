"""Real-time factor of encoding and decoding audio, for every audio tokenizer, on this machine's CPU.

    python bench/tokenizers_audio.py                                   # untrained weights, the tiny recipes' shapes
    python bench/tokenizers_audio.py --codec runs/audio_codec --mel runs/audio_mel_diffusion   # trained ones
    python bench/tokenizers_audio.py --threads 1 --seconds 5

RTF = compute seconds / audio seconds (below 1: faster than real time), the
median of `--repeats` runs over one clip of `--seconds` of 16 kHz audio.
Speed does not depend on the weights, so untrained modules of the shipped
tiny configs stand in for trained ones. The pretrained-codec rows use the
real EnCodec 24 kHz, DAC 16 kHz and Mimi architectures (transformers' default
configs) with random weights: no weights can be downloaded here.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mllm.detokenizers import DeTokenizer, load_detokenizer
from mllm.detokenizers.audio_codec import CodecDecoder
from mllm.detokenizers.diffusion_mel import MelDiffusionDecoder
from mllm.detokenizers.hf_codec import HFCodecDecoder
from mllm.media import Audio
from mllm.tokenize.recipes import load_recipe
from mllm.tokenizers import MediaTokenizer, load_media_tokenizer
from mllm.tokenizers.audio_codec import CodecTokenizer
from mllm.tokenizers.hf_codec import HFCodecConfig, HFCodecTokenizer
from mllm.tokenizers.mel_latent import MelLatentTokenizer

REPO = Path(__file__).resolve().parents[1]


def speechlike(seconds: float, rate: int = 16000) -> Audio:
    """A voiced buzz (120 Hz harmonics) with a moving formant and syllable-rate amplitude: deterministic."""
    t = np.arange(round(seconds * rate)) / rate
    buzz = sum(np.sin(2 * np.pi * 120 * k * t) / k for k in range(1, 30))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) * (1 + 0.5 * np.sin(2 * np.pi * (500 + 300 * np.sin(t)) * t))
    wave = buzz * envelope
    return Audio((0.3 * wave / np.abs(wave).max())[None].astype(np.float32), rate)


def trained_or_tiny(trained: str | None, recipe: str, build) -> tuple[MediaTokenizer, DeTokenizer]:
    if trained:
        return load_media_tokenizer(Path(trained) / "media_tokenizer"), load_detokenizer(Path(trained) / "detokenizer")
    _, cfg = load_recipe(REPO / "tokenizers" / recipe)
    return build(cfg.model)


def hf_codecs(tmp: Path) -> dict[str, tuple[MediaTokenizer, DeTokenizer]]:
    from transformers import DacConfig, DacModel, EncodecConfig, EncodecModel, MimiConfig, MimiModel

    out = {}
    for name, model in [("EnCodec 24 kHz", EncodecModel(EncodecConfig())), ("DAC 16 kHz", DacModel(DacConfig())),
                        ("Mimi", MimiModel(MimiConfig()))]:
        model.save_pretrained(tmp / name.split()[0])
        cfg = HFCodecConfig(path=str(tmp / name.split()[0]), codebooks=1)
        out[f"hf_codec: {name} (random weights), 1 codebook"] = (HFCodecTokenizer(cfg).eval(), HFCodecDecoder(cfg).eval())
    return out


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", help="a trained audio_codec directory (default: untrained tiny config)")
    parser.add_argument("--mel", help="a trained audio_mel_diffusion directory (default: untrained tiny config)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the de-tokenizer's)")
    parser.add_argument("--no-hf", action="store_true", help="skip the pretrained-codec architectures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    audio = speechlike(args.seconds)
    pairs = {
        "audio_codec (tiny)": trained_or_tiny(args.codec, "audio_codec_tiny.yaml",
                                              lambda c: (CodecTokenizer(c).eval(), CodecDecoder(c).eval())),
        "mel_latent + diffusion_mel (tiny)": trained_or_tiny(
            args.mel, "audio_mel_diffusion_tiny.yaml",
            lambda c: (MelLatentTokenizer(c.latents).eval(), MelDiffusionDecoder(c).eval())),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_hf:
            pairs.update(hf_codecs(Path(tmp)))
        print(f"{args.seconds:g} s of 16 kHz audio, {args.threads} thread(s), median of {args.repeats}")
        print(f"{'tokenizer':58s} {'tokens/s':>9s} {'encode RTF':>11s} {'decode RTF':>11s}")
        for name, (tokenizer, detokenizer) in pairs.items():
            with torch.no_grad():
                tokens = tokenizer.encode(audio)
                encode = timed(lambda: tokenizer.encode(audio), args.repeats)
                decode = timed(lambda: detokenizer.decode(tokens, steps=args.steps,
                                                          generator=torch.Generator().manual_seed(0)), args.repeats)
            rate = len(tokens) / args.seconds
            print(f"{name:58s} {rate:9.1f} {encode / args.seconds:11.4f} {decode / args.seconds:11.4f}", flush=True)


if __name__ == "__main__":
    main()
