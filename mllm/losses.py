"""Loss functions. Pure: tensors in, scalar out, no module state."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mllm.sequence import IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over text and discrete media codes.

    logits [B, T, V], labels [B, T] with IGNORE_INDEX where no loss applies.
    Position t predicts label t+1; the mean is over labelled positions, in fp32.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    if not (shift_labels != IGNORE_INDEX).any():
        return shift_logits.sum() * 0.0  # keeps the graph (and DDP/ZeRO hooks) alive on an unlabelled batch
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
