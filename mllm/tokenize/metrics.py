"""Reconstruction metrics the tokenizer recipes report.

    psnr_db(original [..] in [0, 1], reconstruction [..] in [0, 1])  -> dB
    codebook_usage([codes [B, N], ...], codebook_size)                 -> {"codebook_utilisation", "codebook_perplexity"}
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr_db(original: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two same-shape tensors of values in [0, 1]."""
    mse = float(F.mse_loss(original, reconstruction))
    return 10 * math.log10(1 / max(mse, 1e-10))


def codebook_usage(codes: list[torch.Tensor], codebook_size: int) -> dict[str, float]:
    """The share of codes used at least once, and the perplexity of their frequencies (= codebook_size when uniform)."""
    counts = torch.bincount(torch.cat(codes).flatten(), minlength=codebook_size).double()
    p = counts[counts > 0] / counts.sum()
    return {
        "codebook_utilisation": round(float((counts > 0).double().mean()), 4),
        "codebook_perplexity": round(float(torch.exp(-(p * p.log()).sum())), 1),
    }
