"""The training step: the multimodal step (media splice + head loss) against the bare HF LM step.

Both models have the same LM (size, grown vocabulary) and see batches of the same
[rows, T] token count; a step is forward, backward and AdamW. The multimodal batch
(models.multimodal_batch) splices image features in with `masked_scatter`, holds an
audio code span, and trains the diffusion head on a video span. A fp32 matmul runs in
the same alternation, so the step's model-FLOP utilisation is against the peak
measured beside it. Target: multimodal ≥ 0.9 × HF.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mllm.bench import machine, models
from mllm.bench.profile import extra_time
from mllm.bench.report import Figure, rate_figure
from mllm.bench.settings import Settings
from mllm.bench.timing import alternate
from mllm.sequence import MultimodalBatch

SECTION = "2. training step"
TARGET = 0.9


def stepper(model: nn.Module, inputs: list[dict]) -> Callable[[], None]:
    """A function doing one training step (forward, backward, AdamW) on each of `inputs`, in order."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def steps() -> None:
        for x in inputs:
            model(**x).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return steps


def hf_inputs(batch: MultimodalBatch) -> dict:
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}


def steps(lm: dict, rows: int, length: int) -> tuple[Callable[[], None], Callable[[], None], nn.Module]:
    """(HF step, multimodal step, the multimodal model) at [rows, length]."""
    mm = models.multimodal(lm)
    hf = models.base_lm(lm, vocab_size=mm.layout.vocab_size)
    batch = models.multimodal_batch(mm, rows, length)
    text = models.text_batch(rows, length, mm.layout.text_vocab_size)
    return stepper(hf, [hf_inputs(text)]), stepper(mm, [batch.model_inputs()]), mm


def run(s: Settings) -> list[Figure]:
    lm = s.pick(models.llama(256, 4), models.llama(384, 6))
    rows, length = s.pick((4, 256), (4, 512))
    hf, mm, model = steps(lm, rows, length)
    n, calls = 2048, 2
    times = alternate({"hf": hf, "mm": mm, "matmul": machine.matmul(n, calls)}, s.repeats)
    tokens = rows * length
    params = sum(p.numel() for p in model.language_model.parameters()) / 1e6
    shape = f"{params:.1f}M-parameter Llama, batch {rows}×{length}"
    step = rate_figure(SECTION, "multimodal step", "tok/s", tokens, times["mm"], "HF LM step", times["hf"],
                       target=TARGET, note=shape)
    if step.met is False:
        step.note += "; " + extra_time(hf, mm)
    gflop = machine.train_flops_per_token(model.language_model.config, length) * tokens / 1e9
    mfu = rate_figure(machine.SECTION, "training step model FLOP/s (MFU = ratio)", "GFLOP/s", gflop, times["mm"],
                      f"fp32 matmul {n}² peak", times["matmul"], baseline_work=2 * n**3 * calls / 1e9,
                      note=f"{shape}; 6·N + 12·L·H·T FLOP per token")
    return [mfu, step]
