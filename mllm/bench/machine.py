"""The machine's limit: fp32 matmul GFLOP/s, and the model FLOPs a training step does against it.

Peak is a square fp32 matmul of side n (2n³ FLOP), with all of torch's threads against one thread.
A training step's model FLOPs per token (PaLM's count, forward + backward, no recomputation):

    6 · (parameters of every matmul: attention, MLP, lm_head; not the input embedding) + 12 · layers · hidden · T
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from mllm.bench.report import Figure
from mllm.bench.settings import Settings
from mllm.bench.timing import alternate

SECTION = "1. machine"


def matmul(n: int, calls: int):
    """A function doing `calls` fp32 [n, n] @ [n, n] products: 2·n³·calls FLOP."""
    a, b = torch.randn(n, n), torch.randn(n, n)

    def run() -> None:
        for _ in range(calls):
            torch.mm(a, b)

    return run


def one_thread(fn):
    def run() -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(threads)

    return run


def train_flops_per_token(config: PretrainedConfig, length: int) -> float:
    h, layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * h * config.intermediate_size  # gate, up, down
    params = layers * (attention + mlp) + h * config.vocab_size  # + lm_head
    return 6 * params + 12 * layers * h * length


def run(s: Settings) -> list[Figure]:
    n, calls = 2048, s.pick(2, 4)
    work = 2 * n**3 * calls / 1e9
    fn = matmul(n, calls)
    times = alternate({"all": fn, "one": one_thread(fn)}, s.repeats)
    value, best = times["all"].rate(work)
    base, base_best = times["one"].rate(work)
    return [Figure(SECTION, f"fp32 matmul {n}², {torch.get_num_threads()} threads", "GFLOP/s", value, best,
                   "1 thread", base, base_best, note="the ratio is the speed-up from threads")]
