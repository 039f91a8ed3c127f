"""Packing: several samples per fixed-length row, with no attention and no labels across documents.

    batch = pack_collate(samples, max_length, pad_id, attn_implementation="sdpa")
    model(**batch.model_inputs())

A packed row of length T = max_length holds documents d_0, d_1, ... and then padding:

    input_ids     [B, T]  the documents' ids back to back, then pad_id
    position_ids  [B, T]  0..n_0-1, 0..n_1-1, ..., then 0..n_pad-1: each document starts at 0
    labels        [B, T]  each document's labels, with IGNORE_INDEX at its first token and on padding.
                          The model shifts labels (logits at t predict label t+1), so the last token
                          of d_i is never trained to predict the first token of d_i+1.
    features[m]   [n, D]  every document's rows of modality m, in packed (reading) order

How documents are kept apart depends on the model's `config._attn_implementation`:

    "sdpa"      attention_mask [B, 1, T, T] bool, True where query t may see key s:
                same document and s <= t (block-diagonal causal)
    "eager"     the same mask as additive floats (0 or the dtype's min), which eager attention adds
    "flash_*"   the rows flattened into one [1, B*T] sequence and attention_mask None: transformers
                finds the documents where position_ids restart at 0 and runs flash-attn's varlen kernel

Transformers passes a 4D mask through as is, so `MultimodalLM.forward` takes the batch unchanged.
The padding tail is a document of its own, so no query row is ever fully masked.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence

import torch

from mllm.sequence import IGNORE_INDEX, MultimodalBatch, Sample, concat_features


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each bin's total <= capacity: longest first, into the first bin with room."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"item {i} is {n} long, over the capacity {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b, r in enumerate(room) if r >= lengths[i]), None)
        if b is None:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def pack(samples: Sequence[Sample], max_length: int) -> list[list[Sample]]:
    """Samples -> rows of samples, each row at most max_length tokens (first-fit decreasing)."""
    return [[samples[i] for i in b] for b in first_fit_decreasing([len(s) for s in samples], max_length)]


def pack_stream(
    samples: Iterable[Sample], max_length: int, rows: int, buffer_size: int = 1024, seed: int = 0
) -> Iterator[list[list[Sample]]]:
    """Batches of `rows` packed rows from a stream: first-fit decreasing over `buffer_size` samples at a time.

    The least-filled rows of each round, too few for a whole batch, go back into the
    buffer to be packed with the next samples; only the stream's last batch may be short.
    The rows that are batched are shuffled (seeded), so a batch mixes long and short
    documents instead of the fullest rows coming first.
    """
    if buffer_size < rows:
        raise ValueError(f"buffer_size {buffer_size} must be at least rows {rows}")
    rng = random.Random(seed)
    buffer: list[Sample] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            packed = sorted(pack(buffer, max_length), key=lambda row: -sum(map(len, row)))
            full = len(packed) // rows * rows
            batched = packed[:full]
            rng.shuffle(batched)
            yield from (batched[i : i + rows] for i in range(0, full, rows))
            buffer = [s for row in packed[full:] for s in row]
    packed = pack(buffer, max_length)
    rng.shuffle(packed)
    yield from (packed[i : i + rows] for i in range(0, len(packed), rows))


def collate_rows(
    rows: Sequence[Sequence[Sample]],
    max_length: int,
    pad_id: int,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> MultimodalBatch:
    """Rows of samples (each row's total <= max_length) -> one packed batch (see the module docstring).
    `dtype` is the model's: the additive mask of eager attention uses its min."""
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    B, T = len(rows), max_length
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.empty((B, T), dtype=torch.long)
    documents = torch.empty((B, T), dtype=torch.long)  # document index within its row; padding is one more
    for r, row in enumerate(rows):
        start = 0
        for d, s in enumerate(row):
            end = start + len(s)
            if end > T:
                raise ValueError(f"row {r} holds {sum(map(len, row))} tokens, over max_length {T}")
            ids[r, start:end], labels[r, start:end] = s.input_ids, s.labels
            labels[r, start] = IGNORE_INDEX  # predicted by the previous document's last token
            positions[r, start:end], documents[r, start:end] = torch.arange(len(s)), d
            start = end
        positions[r, start:], documents[r, start:] = torch.arange(T - start), len(row)
    media = concat_features([s for row in rows for s in row])  # features, targets, transcripts
    if attn_implementation.startswith("flash"):
        flat = (1, B * T)
        return MultimodalBatch(ids.view(flat), None, labels.view(flat), positions.view(flat), *media)
    return MultimodalBatch(ids, block_causal_mask(documents, attn_implementation, dtype), labels, positions, *media)


def block_causal_mask(documents: torch.Tensor, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """documents [B, T] (document index per token) -> mask [B, 1, T, T]: bool for sdpa, additive for eager."""
    T = documents.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # [T, T], key s <= query t
    allowed = (documents[:, :, None] == documents[:, None, :]) & causal  # [B, T, T]
    if attn_implementation == "sdpa":
        return allowed.unsqueeze(1)
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
    raise ValueError(f"packing supports sdpa, eager and flash_attention_*, not {attn_implementation!r}")


def pack_collate(
    samples: Sequence[Sample],
    max_length: int,
    pad_id: int,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> MultimodalBatch:
    """Samples -> as few rows of max_length as first-fit decreasing finds -> one packed batch.
    A sample longer than max_length raises: nothing is truncated."""
    return collate_rows(pack(samples, max_length), max_length, pad_id, attn_implementation=attn_implementation, dtype=dtype)
