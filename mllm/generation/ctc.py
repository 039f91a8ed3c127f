"""CTC readout of per-position log-probabilities: the most likely label sequences, and one sequence's likelihood.

A model trained with a CTC term at some positions (mllm's `loss.transcripts`: the slots of a spoken item
spell its transcript, with the item's placeholder id as the blank) can be read there without generating:

    nbest = ctc_prefix_beam_search(log_probs, blank)     # [(ids, log p(ids)), ...], most likely first
    ctc_log_likelihood(log_probs, ids, blank)            # log p(ids), summed over every alignment

Joint CTC/attention decoding (`Pipeline.transcribe`) rescores these with the LM's own reply likelihood.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F

NEG_INF = -math.inf


def _logaddexp(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def ctc_prefix_beam_search(
    log_probs: torch.Tensor, blank: int, beam: int = 8, top_k: int = 8
) -> list[tuple[list[int], float]]:
    """The `beam` most likely label sequences of log_probs [T, V] (log-softmaxed over V), most likely first,
    each with its log-probability summed over its alignments (prefix beam search, Hannun et al. 2014). Each
    step tries only its `top_k` most likely labels; an empty sequence is a candidate like any other."""
    if log_probs.dim() != 2 or not 0 <= blank < log_probs.shape[1]:
        raise ValueError(f"need log_probs [T, V] and a blank in [0, V), got {tuple(log_probs.shape)} and {blank}")
    if beam < 1 or top_k < 1:
        raise ValueError(f"beam and top_k must be >= 1, got {beam} and {top_k}")
    # prefix -> [log p(its alignments that end in a blank), log p(those that end in its last label)]
    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, NEG_INF]}
    for step in log_probs.detach().float().cpu():
        labels = [c for c in step.topk(min(top_k, step.numel())).indices.tolist() if c != blank]
        step = step.tolist()
        grown: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [NEG_INF, NEG_INF])
        for prefix, (ends_blank, ends_label) in beams.items():
            stay = grown[prefix]  # a blank keeps the prefix as it is
            stay[0] = _logaddexp(stay[0], _logaddexp(ends_blank, ends_label) + step[blank])
            for c in labels:
                longer = grown[prefix + (c,)]
                if prefix and c == prefix[-1]:
                    # the last label again: without a blank between it merges into that label,
                    # after one it is a second copy
                    stay[1] = _logaddexp(stay[1], ends_label + step[c])
                    longer[1] = _logaddexp(longer[1], ends_blank + step[c])
                else:
                    longer[1] = _logaddexp(longer[1], _logaddexp(ends_blank, ends_label) + step[c])
        ranked = sorted(grown.items(), key=lambda kv: -_logaddexp(*kv[1]))
        beams = dict(ranked[:beam])
    return [(list(prefix), _logaddexp(*scores)) for prefix, scores in beams.items()]


def ctc_log_likelihood(log_probs: torch.Tensor, ids: list[int], blank: int) -> float:
    """log p(ids | log_probs [T, V]) under CTC, summed over alignments; -inf when T is too short for them."""
    targets = torch.tensor(ids, dtype=torch.long)
    nll = F.ctc_loss(log_probs.float()[:, None], targets[None], torch.tensor([log_probs.shape[0]]),
                     torch.tensor([len(ids)]), blank=blank, reduction="sum")
    return -float(nll)
