"""Throughput of the image tokenizers and de-tokenizers, and the diffusion de-tokenizer's cost per step.

    python bench/tokenizers_image.py [--trained DIR] [--batch 64] [--threads 2]

Modules are sized by the tiny recipes in tokenizers/ and built untrained (weights do not change the
cost); with --trained DIR, the trained recipes DIR/{fsq,query,diffusion} are loaded instead. Prints
encode and decode items/s at batch 1 and at --batch, and ms per diffusion step (with classifier-free
guidance, i.e. a doubled batch, and without).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mllm.detokenizers import load_detokenizer
from mllm.media import Image
from mllm.tokenize.image_recipes import build_diffusion, build_discrete
from mllm.tokenize.recipes import load_recipe
from mllm.tokenizers import load_media_tokenizer
from mllm.tokenizers.fsq_image import FSQImageTokenizer
from mllm.tokenizers.query_image import QueryImageTokenizer

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {  # trained-directory name -> (tiny recipe, builder of an untrained pair)
    "fsq": ("image_fsq_tiny.yaml", lambda cfg: build_discrete(FSQImageTokenizer, cfg)),
    "query": ("image_query_tiny.yaml", lambda cfg: build_discrete(QueryImageTokenizer, cfg)),
    "diffusion": ("image_diffusion_tiny.yaml", build_diffusion),
}


def per_second(fn: Callable[[], object], items: int, min_seconds: float = 2.0) -> float:
    """items/s of `fn` (which handles `items` items), after one warm-up call, over at least `min_seconds`."""
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or calls < 2:
        fn()
        calls += 1
    return items * calls / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", type=Path, default=None, help="directory with trained fsq/, query/, diffusion/")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'pair':<34} {'encode/s b1':>11} {'encode/s bB':>11} {'decode/s b1':>11} {'decode/s bB':>11}")
    for key, (recipe_file, build) in PAIRS.items():
        if args.trained is not None:
            tokenizer = load_media_tokenizer(args.trained / key / "media_tokenizer")
            detokenizer = load_detokenizer(args.trained / key / "detokenizer")
        else:
            tokenizer, detokenizer = build(load_recipe(ROOT / "tokenizers" / recipe_file)[1])
        tokenizer.eval()
        detokenizer.eval()
        size = tokenizer.image_size
        images = [Image(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(args.batch)]
        tokens = tokenizer.encode_batch(images)
        steps = getattr(getattr(detokenizer.config, "diffusion", None), "steps", None)
        with torch.no_grad():
            encode_1 = per_second(lambda: tokenizer.encode(images[0]), 1)
            encode_b = per_second(lambda: tokenizer.encode_batch(images), args.batch)
            decode_1 = per_second(lambda: detokenizer.decode(tokens[0], guidance=2.0), 1)
            decode_b = per_second(lambda: detokenizer.decode_batch(tokens, **({"guidance": 2.0} if steps else {})), args.batch)
        name = f"{tokenizer.name} -> {detokenizer.name}" + (f" ({steps} steps, cfg)" if steps else "")
        print(f"{name:<34} {encode_1:>11.1f} {encode_b:>11.1f} {decode_1:>11.2f} {decode_b:>11.2f}")
        if steps:
            for b in (1, args.batch):
                x = torch.randn(b, *detokenizer.sample_shape)
                t = torch.full((b,), 500.0)
                cond = tokens[:b]
                with torch.no_grad():
                    plain = per_second(lambda: detokenizer.denoise(x, t, cond), 1)
                    guided = per_second(
                        lambda: detokenizer.denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond])), 1
                    )
                print(f"  {detokenizer.name} step, batch {b:<4} {1000 / plain:9.1f} ms   with cfg {1000 / guided:9.1f} ms")


if __name__ == "__main__":
    main()
