"""Loss functions. Pure: tensors in, scalar out, no module state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from mllm.sequence import IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over text and discrete media codes.

    logits [B, T, V], labels [B, T] with IGNORE_INDEX where no loss applies.
    Position t predicts label t+1; the mean is over labelled positions, in fp32. The labels
    are shifted, not the logits: slicing [B, T-1, V] would copy the largest tensor of the step.
    """
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1).to(logits.device)  # [B·T]
    flat_logits = logits.reshape(-1, logits.size(-1)).float()  # [B·T, V], a view when fp32
    if not (shift_labels != IGNORE_INDEX).any():
        return flat_logits.sum() * 0.0  # keeps the graph (and DDP/ZeRO hooks) alive on an unlabelled batch
    return F.cross_entropy(flat_logits, shift_labels, ignore_index=IGNORE_INDEX)


def ctc_loss(
    logits: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor, blank: int = 0
) -> torch.Tensor:
    """Connectionist temporal classification, in fp32: each row's label sequence, spelled by its logits.

    logits [B, T, C]; lengths [B], the row's valid steps (cut to T); targets [ΣS], the rows' labels back to
    back, target_lengths [B]; `blank`, the class for "no new label here". Each row's NLL is divided by its
    S_b, then the rows are averaged. A row too short for its labels counts 0 rather than inf.
    """
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # [T, B, C], as F.ctc_loss wants
    return F.ctc_loss(log_probs, targets, lengths.clamp(max=logits.shape[1]), target_lengths, blank=blank,
                      zero_infinity=True)


def bag_of_words_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of word logits [B, V] against word distributions [B, V] (each row sums to 1, or is all zero:
    no caption, no loss). Mean over the rows with a caption; 0 when none has one."""
    has_words = target.sum(-1) > 0  # [B]
    if not has_words.any():
        return logits.sum() * 0.0
    nll = -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1)  # [B]
    return nll[has_words].mean()


def gaussian_mixture(logits: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> MixtureSameFamily:
    """k diagonal Gaussians over D dimensions, per row: logits [M, k], means and stds [M, k, D], in fp32."""
    components = Independent(Normal(means.float(), stds.float(), validate_args=False), 1)
    return MixtureSameFamily(Categorical(logits=logits.float(), validate_args=False), components, validate_args=False)


def gmm_nll(logits: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood [M] in nats of each target row [M, D] under its mixture.

    MixtureSameFamily sums the components with a logsumexp, so the value stays
    finite however far a target lies from every component.
    """
    return -gaussian_mixture(logits, means, stds).log_prob(target.float())


def mixture_mean(logits: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The mixtures' means [M, D]: Σ_k π_k μ_k, from logits [M, k] and means [M, k, D]."""
    return (logits.softmax(-1).unsqueeze(-1) * means).sum(1)


def mixture_mean_mse(logits: torch.Tensor, means: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error of each mixture's mean against its target row [M, D], averaged over rows and dimensions, in fp32.

    The NLL alone can be met without the context: k components spread over the
    modes of all the targets fit them well whatever the hidden state says. The
    mixture's mean is then the average of every target, and a head read out by
    its mean writes that average for every prompt. This term asks the mean
    itself to be the conditional mean.
    """
    return F.mse_loss(mixture_mean(logits.float(), means.float()), target.float())


def multimodal_loss(
    lm_loss: torch.Tensor | None, head_losses: dict[str, torch.Tensor], weights: dict[str, float]
) -> torch.Tensor | None:
    """The training objective: CE over text and codes + Σ_m λ_m · head loss of modality m.

    None when there is neither a CE term nor a head term.
    """
    terms = [] if lm_loss is None else [lm_loss]
    terms += [weights[m] * loss for m, loss in sorted(head_losses.items())]
    return torch.stack(terms).sum() if terms else None
