"""Generation with a KV cache: one prefill over the (left-padded) prompt, then one token per step.

The engine sees only ids, masks and features, never media or tokenizers.
"""

from __future__ import annotations

import torch

from mllm.model import MultimodalLM
from mllm.sequence import MultimodalBatch


@torch.no_grad()
def greedy_generate(
    model: MultimodalLM, batch: MultimodalBatch, *, max_new_tokens: int, eos_token_id: int
) -> list[list[int]]:
    """Greedy text continuation of each prompt row; stops a row at `eos_token_id` (not returned)."""
    if batch.attention_mask[:, -1].eq(0).any():
        raise ValueError("prompts must be left-padded: the last column is padding in some row")
    mask = batch.attention_mask
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T], padding-aware
    out = model(
        input_ids=batch.input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        features=batch.features,
        use_cache=True,
        logits_to_keep=1,
    )
    rows = batch.input_ids.shape[0]
    generated = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool, device=mask.device)
    next_pos = position_ids[:, -1:] + 1  # [B, 1]
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)  # [B]
        done |= token.eq(eos_token_id)
        for r in (~done).nonzero().flatten().tolist():
            generated[r].append(int(token[r]))
        if done.all():
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        next_pos = next_pos + 1
    return generated
