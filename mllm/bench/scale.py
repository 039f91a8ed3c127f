"""Scale: the cost of each stage as its work doubles, to show how it grows.

Three stages of one random multimodal model (models.py; Llama hidden 256, 4 layers, 8k text vocabulary):

    train step  forward, backward and AdamW on a multimodal batch
    prefill     a no-grad forward of the whole batch
    generate    16 new text tokens after the batch as prompt (KV cache)

each at sequence length 256, 512, 1024, 2048 (batch 1) and at batch 1, 2, 4, 8 (length 256).
A figure is the seconds at 2x against the seconds at x: a ratio of 2 is linear growth, 4 quadratic,
below 2 means the doubled work used the machine better. All sizes of a stage are timed alternately.
"""

from __future__ import annotations

import torch

from mllm.bench import models
from mllm.bench.report import Figure
from mllm.bench.settings import Settings
from mllm.bench.timing import alternate
from mllm.bench.training import stepper
from mllm.generation import GenerationConfig, generate
from mllm.model import MultimodalLM

SECTION = "8. scale"
LENGTHS, BATCHES, NEW_TOKENS = (256, 512, 1024, 2048), (1, 2, 4, 8), 16


def stage_fns(model: MultimodalLM, stage: str, rows: int, length: int):
    batch = models.multimodal_batch(model, rows, length)
    if stage == "train step":
        return stepper(model, [batch.model_inputs()])
    if stage == "prefill":
        inputs = batch.model_inputs() | {"labels": None, "feature_targets": {}}

        def forward() -> None:
            with torch.no_grad():
                model(**inputs)

        return forward
    prompt = models.prompt(model, rows, length)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, seed=0)
    return lambda: generate(model, prompt, config)


def run(s: Settings) -> list[Figure]:
    model = models.multimodal(models.llama(256, 4, vocab=8000))
    figures = []
    for stage in ("train step", "prefill", "generate"):
        for axis, sizes in (("length", LENGTHS), ("batch", BATCHES)):
            shapes = {n: (1, n) if axis == "length" else (n, 256) for n in sizes}
            times = alternate({n: stage_fns(model, stage, *shape) for n, shape in shapes.items()}, s.repeats)
            for small, big in zip(sizes, sizes[1:]):
                figures.append(Figure(SECTION, f"{stage}, {axis} {small} → {big}", "s", times[big].median,
                                      times[big].min, f"{axis} {small}", times[small].median, times[small].min))
    return figures
