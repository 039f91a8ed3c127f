"""Token sequences with media: one `Sample` per conversation, `MultimodalBatch` per step.

Continuous features travel beside the ids. For each modality, `features[m]` is
[n, D]: one row per placeholder token of that modality in `input_ids`, in
reading order (row-major over the batch), which is the order
`masked_scatter` fills them in. `feature_targets[m]` [n] marks the rows the
model must learn to produce (media in assistant turns). `transcripts[m]` holds,
when asked for, one id tensor per item of m in the same order: the text said
in that input item (empty when none is known, and for target items).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100  # label of positions that carry no loss


@dataclass
class Sample:
    """One tokenized conversation."""

    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long, IGNORE_INDEX outside assistant content
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # m -> [n_m, D_m]
    feature_targets: dict[str, torch.Tensor] = field(default_factory=dict)  # m -> [n_m] bool
    transcripts: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # m -> [S_i] long per item

    def __len__(self) -> int:
        return self.input_ids.numel()


@dataclass
class MultimodalBatch:
    """What `MultimodalLM.forward` takes (see `model_inputs`)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    labels: torch.Tensor | None = None  # [B, T]
    position_ids: torch.Tensor | None = None  # [B, T]; restarts at 0 per packed document
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    feature_targets: dict[str, torch.Tensor] = field(default_factory=dict)
    transcripts: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "MultimodalBatch":
        """Move to `device`; `dtype` casts only the floating-point features."""

        def move(t):
            return None if t is None else t.to(device)

        return MultimodalBatch(
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            labels=move(self.labels),
            position_ids=move(self.position_ids),
            features={m: f.to(device=device, dtype=dtype or f.dtype) for m, f in self.features.items()},
            feature_targets={m: move(t) for m, t in self.feature_targets.items()},
            transcripts=self.transcripts,  # host-side ids: the CTC term joins them and moves them in one copy
        )

    def model_inputs(self) -> dict:
        inputs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "features": self.features,
            "feature_targets": self.feature_targets,
        }
        if self.labels is not None:
            inputs["labels"] = self.labels
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        if self.transcripts:
            inputs["transcripts"] = self.transcripts
        return inputs


def pad_collate(samples: list[Sample], pad_id: int, padding_side: str = "right") -> MultimodalBatch:
    """Pad samples to the longest; left padding is what generation wants."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got '{padding_side}'")
    length = max(len(s) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, s in enumerate(samples):
        span = slice(length - len(s), length) if padding_side == "left" else slice(0, len(s))
        ids[row, span], labels[row, span], mask[row, span] = s.input_ids, s.labels, 1
    return MultimodalBatch(ids, mask, labels, None, *concat_features(samples))


def concat_features(
    samples: list[Sample],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Per-modality features, target flags and transcripts of several samples, in sample order."""
    names = sorted({m for s in samples for m in s.features})
    features, targets = {}, {}
    for m in names:
        rows = [s for s in samples if m in s.features]
        features[m] = torch.cat([s.features[m] for s in rows])
        targets[m] = torch.cat([s.feature_targets[m] for s in rows])
    transcripts = {m: [t for s in samples for t in s.transcripts.get(m, [])] for m in names}
    return features, targets, {m: ts for m, ts in transcripts.items() if ts}
