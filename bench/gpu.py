"""GPU benchmark: bf16 training tokens/s and MFU of a ~1B-parameter Llama (sdpa vs flash-attn 2), and
generation tokens/s of the mllm engine against HF `generate`. Run by bench/gpu.sh; prints a Markdown
block to paste into docs/performance.md.

    python bench/gpu.py                                       # H100: about 5 minutes
    python bench/gpu.py --device cpu --dtype float32 --hidden 128 --layers 2 --seq 128 --batch 2 \\
        --steps 2 --new-tokens 8 --matmul 256                 # a toy run that checks the script

The model is random (speed does not depend on weights): Llama hidden 2048, 16 layers, MLP 5632,
32k vocabulary, about 1.0 B parameters. A training step is forward, backward and AdamW on
[batch, seq] tokens. MFU is model FLOP/s (machine.train_flops_per_token) over the card's measured
dense matmul peak in the same dtype (timed alternately with the steps). Attention implementations
alternate by switching the same model's config, so both see the same weights and memory.
"""

from __future__ import annotations

import argparse

import torch
from transformers.utils import is_flash_attn_2_available

from mllm.bench import models
from mllm.bench.generation import hf, ours
from mllm.bench.machine import train_flops_per_token
from mllm.bench.options import positive_int
from mllm.bench.timing import alternate
from mllm.bench.training import stepper

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def matmul(n: int, dtype: torch.dtype, device: str, calls: int = 10):
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    return lambda: [torch.mm(a, b) for _ in range(calls)], 2 * n**3 * calls


def with_attention(model, name: str, fn):
    """fn run with the model's attention implementation set to `name`."""

    def run() -> None:
        model.config._attn_implementation = name
        fn()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--hidden", type=positive_int, default=2048)
    parser.add_argument("--layers", type=positive_int, default=16)
    parser.add_argument("--seq", type=positive_int, default=2048)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, default=5, help="timed repeats of each variant")
    parser.add_argument("--new-tokens", type=positive_int, default=128)
    parser.add_argument("--matmul", type=positive_int, default=8192, help="side of the peak-FLOP matmul")
    args = parser.parse_args()
    device, dtype = args.device, DTYPES[args.dtype]
    card = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    attns = ["sdpa"] + (["flash_attention_2"] if device.startswith("cuda") and is_flash_attn_2_available() else [])

    torch.manual_seed(0)
    lm = models.llama(args.hidden, args.layers)
    with torch.device(device):
        model = models.base_lm(lm).to(dtype)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    ids = torch.randint(3, lm["vocab_size"], (args.batch, args.seq), device=device)
    step = stepper(model, [{"input_ids": ids, "labels": ids}])
    peak_fn, peak_work = matmul(args.matmul, dtype, device)
    variants = {a: with_attention(model, a, step) for a in attns} | {"matmul": peak_fn}
    times = alternate(variants, args.steps)
    tokens = args.batch * args.seq
    flop = train_flops_per_token(model.config, args.seq) * tokens
    peak = peak_work / times["matmul"].median

    print(f"### GPU: {card}\n")
    print(f"torch {torch.__version__}, {args.dtype}, Llama {params:.2f} B parameters (hidden {args.hidden}, "
          f"{args.layers} layers), batch {args.batch}×{args.seq}, median of {args.steps} alternated repeats; "
          f"matmul {args.matmul}² peak {peak / 1e12:.1f} TFLOP/s measured.\n")
    print("| training step | tokens/s (median) | best | model TFLOP/s | MFU vs measured matmul peak |")
    print("|---|---|---|---|---|")
    for a in attns:
        rate, best = times[a].rate(tokens)
        achieved = flop / times[a].median
        print(f"| {a} | {rate:,.0f} | {best:,.0f} | {achieved / 1e12:.1f} | {achieved / peak:.0%} |")
    if len(attns) == 1:
        print("\nflash-attn is not installed (or no CUDA): only sdpa was measured.")
    del step, model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    with torch.device(device):
        mm = models.multimodal(lm, tokens_per_item=args.new_tokens).to(dtype).eval()
    prompt = models.prompt(mm, 1, 16).to(device)
    gen = {"HF generate": hf(mm, prompt, args.new_tokens), "mllm engine": ours(mm, prompt, args.new_tokens)}
    with torch.no_grad():
        gtimes = alternate(gen, args.steps)
    print(f"\n| generation, batch 1, {args.new_tokens} new tokens, sdpa | tokens/s (median) | best | ratio to HF |")
    print("|---|---|---|---|")
    for name, t in gtimes.items():
        rate, best = t.rate(args.new_tokens)
        print(f"| {name} | {rate:,.1f} | {best:,.1f} | {gtimes['HF generate'].median / t.median:.2f}× |")


if __name__ == "__main__":
    main()
