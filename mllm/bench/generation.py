"""Generation: tokens/s of each kind of span, against HF `generate` on text; KV cache; batch 1 against 8.

One random Llama-style LM carries the three modalities of models.py. Every variant
generates N positions after the same 16-token prompt (the diffusion spans, at 100 steps
per feature the costliest, 4 with --quick):

    hf text          language_model.generate, greedy, KV cache: the baseline
    text             the engine on text
    discrete span    a prompt ending in <audio>: N codes, restricted and forced
    gmm span         a prompt ending in <image>: N features, each from head.sample and fed back
    diffusion span   a prompt ending in <video>, at 10, 50 and 100 DDIM steps per feature
    text, no cache   the engine recomputing the whole sequence every step (baseline of the KV cache)
    text, batch 8    8 prompts at once, tokens/s over all rows (baseline: batch 1)

The diffusion head's cost per step is the slope of seconds per feature over the steps.
Targets: discrete ≥ 0.8×, gmm ≥ 0.7× HF generate.
"""

from __future__ import annotations

import torch

from mllm.bench import models
from mllm.bench.profile import extra_time
from mllm.bench.report import Figure, rate_figure
from mllm.bench.settings import Settings
from mllm.bench.timing import alternate
from mllm.generation import GenerationConfig, HeadSampling, generate
from mllm.model import MultimodalLM
from mllm.sequence import MultimodalBatch

SECTION = "5. generation"
PROMPT, BATCH = 16, 8
TARGETS = {"discrete span": 0.8, "gmm span": 0.7}
STEPS = (10, 50, 100)


def ours(model: MultimodalLM, batch: MultimodalBatch, n: int, steps: int | None = None, use_cache: bool = True):
    options = {"video": {"steps": steps}} if steps else {}
    config = GenerationConfig(max_new_tokens=n, use_cache=use_cache, continuous=HeadSampling(options=options), seed=0)
    return lambda: generate(model, batch, config)


def hf(model: MultimodalLM, batch: MultimodalBatch, n: int):
    def run() -> None:
        model.language_model.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)

    return run


def variants(model: MultimodalLM, n: int, n_diffusion: int) -> dict:
    """Name -> a function generating n positions (n_diffusion for the diffusion spans) from its prompt."""
    text = models.prompt(model, 1, PROMPT)
    spans = {
        "hf text": hf(model, text, n),
        "text": ours(model, text, n),
        "discrete span": ours(model, models.prompt(model, 1, PROMPT, "audio"), n),
        "gmm span": ours(model, models.prompt(model, 1, PROMPT, "image"), n),
    }
    video = models.prompt(model, 1, PROMPT, "video")
    spans |= {f"diffusion span, {k} steps": ours(model, video, n_diffusion, k) for k in STEPS}
    return spans | {
        "text, no cache": ours(model, text, n, use_cache=False),
        f"text, batch {BATCH}": ours(model, models.prompt(model, BATCH, PROMPT), n),
    }


def run(s: Settings) -> list[Figure]:
    n, n_diffusion = s.pick(16, 64), s.pick(4, 64)
    model = models.multimodal(models.llama(*s.pick((256, 4), (512, 8))), tokens_per_item=n).eval()
    fns = variants(model, n, n_diffusion)
    with torch.no_grad():
        times = alternate(fns, s.repeats)
    params = sum(p.numel() for p in model.language_model.parameters()) / 1e6
    where = (f"{params:.0f}M-parameter LM, {n} positions after a {PROMPT}-token prompt "
             f"({n_diffusion} for the diffusion spans), batch 1")
    figures = []
    for name in ("text", "discrete span", "gmm span", *(f"diffusion span, {k} steps" for k in STEPS)):
        work = n_diffusion if name.startswith("diffusion") else n
        f = rate_figure(SECTION, name, "tok/s", work, times[name], "HF generate, text", times["hf text"],
                        baseline_work=n, target=TARGETS.get(name), note=where if name == "text" else "")
        if f.met is False:
            f.note = extra_time(fns["hf text"], fns[name])
        figures.append(f)
    figures.append(rate_figure(SECTION, "text with KV cache", "tok/s", n, times["text"], "without KV cache",
                               times["text, no cache"]))
    figures.append(rate_figure(SECTION, f"text at batch {BATCH} (all rows)", "tok/s", n * BATCH,
                               times[f"text, batch {BATCH}"], "batch 1", times["text"], baseline_work=n))
    per_feature = {k: times[f"diffusion span, {k} steps"].median / n_diffusion for k in STEPS}
    slope = (per_feature[STEPS[-1]] - per_feature[STEPS[0]]) / (STEPS[-1] - STEPS[0])
    figures.append(Figure(SECTION, "diffusion head, time per denoising step per feature", "ms", slope * 1e3,
                          note="slope of seconds per feature over 10 → 100 steps, batch 1"))
    return figures
