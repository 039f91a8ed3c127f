"""A small, plain training loop for media tokenizers and de-tokenizers.

The module being trained defines `training_losses(batch) -> {"loss": ..., other terms}`;
this loop owns the optimiser, schedule, clipping, progress bar and history.
Non-finite losses skip the step (and abort after `max_bad_steps` in a row).
`training_metrics` turns the histories into loss.png and a recipe's metrics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mllm.plots import save_loss_curves


@dataclass
class OptimConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    max_bad_steps: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.warmup_steps < 0 or self.max_bad_steps < 1:
            raise ValueError(f"need steps >= 0, batch_size >= 1, warmup_steps >= 0 and max_bad_steps >= 1, got "
                             f"{self.steps}, {self.batch_size}, {self.warmup_steps}, {self.max_bad_steps}")
        if not (self.lr > 0 and self.grad_clip > 0 and self.weight_decay >= 0 and all(0 <= b < 1 for b in self.betas)):
            raise ValueError(f"need lr > 0, grad_clip > 0, weight_decay >= 0 and betas in [0, 1), got {self.lr}, "
                             f"{self.grad_clip}, {self.weight_decay}, {list(self.betas)}")


@dataclass
class EvalConfig:
    """How a recipe's evaluation reconstructs the test split."""

    batch_size: int = 100
    guidance: float | None = None  # diffusion de-tokenizers: classifier-free guidance (None: the de-tokenizer's own)
    steps: int | None = None  # diffusion steps (None: the de-tokenizer's default)
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or (self.steps is not None and self.steps < 1):
            raise ValueError(f"need batch_size >= 1 and steps >= 1 (or null), got {self.batch_size}, {self.steps}")
        if self.guidance is not None and not 0 <= self.guidance < math.inf:
            raise ValueError(f"guidance must be a finite number >= 0 (or null), got {self.guidance}")


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))


def fit(
    module: nn.Module,
    batches: Iterator[Any],
    cfg: OptimConfig,
    *,
    desc: str = "train",
    parameters: list[nn.Parameter] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, list[float]]:
    """Train `module` for `cfg.steps` batches; returns the history of every loss term."""
    params = [p for p in (parameters or module.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, cfg.steps, cfg.warmup_steps))
    history: dict[str, list[float]] = {}
    bad = 0
    module.train()
    bar = tqdm(range(cfg.steps), desc=desc)
    for step in bar:
        losses = module.training_losses(next(batches))
        loss = losses["loss"]
        if not torch.isfinite(loss):
            bad += 1
            if bad >= cfg.max_bad_steps:
                raise FloatingPointError(f"{desc}: {bad} non-finite losses in a row, last at step {step}")
            optimizer.zero_grad(set_to_none=True)
            continue
        bad = 0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        schedule.step()
        values = {k: float(v.detach()) for k, v in losses.items()}
        for k, v in values.items():
            history.setdefault(k, []).append(v)
        bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()})
        if on_step is not None:
            on_step(step, values)
    module.eval()
    return history


def training_metrics(out: Path, history: dict[str, list[float]], steps: int, clock: tuple[float, float],
                     modules: dict[str, nn.Module], name: str) -> dict:
    """Writes `out`/loss.png; returns times, steps, each loss term's final value (mean of the last 50 steps) and
    the parameter count of each module. `clock` = (wall, CPU) seconds at the start."""
    save_loss_curves(history, out / "loss.png", title=name)
    return {
        "train_seconds": round(time.perf_counter() - clock[0], 1),
        "train_cpu_seconds": round(time.process_time() - clock[1], 1),  # all threads: ≈ 2 × wall on an idle 2-core box
        "steps": steps,
        **{f"final_{k}": float(np.mean(v[-50:])) for k, v in history.items()},
        **{f"{k}_parameters": sum(p.numel() for p in m.parameters()) for k, m in modules.items()},
    }
