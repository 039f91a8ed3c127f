"""KV-cached greedy generation equals recomputing the whole sequence at every step."""

from __future__ import annotations

import torch

from mllm.generation import greedy_generate
from mllm.sequence import Sample, pad_collate
from tests.test_model import IMAGE_DIM, image_sequence, wrapped


def recompute_greedy(model, ids: torch.Tensor, feats: torch.Tensor, steps: int) -> list[int]:
    out = []
    for _ in range(steps):
        logits = model(ids, features={"image": feats}).logits
        token = logits[0, -1].argmax()
        out.append(int(token))
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return out


def test_cached_greedy_matches_recomputation_with_left_padding(arch):
    model, _ = wrapped(arch)
    torch.manual_seed(1)
    long_ids, short_ids = image_sequence(model.layout, n=3)[0], image_sequence(model.layout, n=1)[0]
    feats_long, feats_short = torch.randn(6, IMAGE_DIM), torch.randn(2, IMAGE_DIM)
    samples = [
        Sample(long_ids, long_ids, {"image": feats_long}, {"image": torch.zeros(6, dtype=torch.bool)}),
        Sample(short_ids, short_ids, {"image": feats_short}, {"image": torch.zeros(2, dtype=torch.bool)}),
    ]
    batch = pad_collate(samples, pad_id=0, padding_side="left")
    with torch.no_grad():
        got = greedy_generate(model, batch, max_new_tokens=8, eos_token_id=-1)
        want = [recompute_greedy(model, long_ids[None], feats_long, 8), recompute_greedy(model, short_ids[None], feats_short, 8)]
    assert got == want
