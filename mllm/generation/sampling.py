"""Next-token choice from logits [n, V]: guidance, allowed set, repetition penalty, temperature, top-k, top-p."""

from __future__ import annotations

import torch

from mllm.generation.config import TokenSampling


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance on log-probabilities, u + scale · (c − u); the conditional logits untouched at 1."""
    if uncond is None or scale == 1.0:
        return cond
    c, u = cond.log_softmax(-1), uncond.log_softmax(-1)
    return u + scale * (c - u)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on the tokens in `seen` [n, V]: positive logits divided by it, negative ones multiplied."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches p (always at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= p  # the mass before this token already reaches p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def choose_tokens(
    logits: torch.Tensor,
    allowed: torch.Tensor,
    sampling: TokenSampling,
    *,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token [n] per row of logits [n, V], among the `allowed` [V] or [n, V] ids."""
    logits = logits.masked_fill(~allowed, float("-inf"))
    if seen is not None and sampling.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.temperature == 0.0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits / sampling.temperature, sampling.top_k), sampling.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
