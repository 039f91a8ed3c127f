"""Input projectors: continuous media features [n, D] -> LM embeddings [n, H].

Token-wise projectors (`linear`, `mlp2x_gelu`) map each feature row alone. An
item-wise projector (`sees_items = True`, e.g. `context_gru`) also receives the
item lengths, so each token is projected knowing the rest of its item: which
word of an utterance it belongs to, which frame of a clip. It is bidirectional
within an item, so it may only feed media whose features are given whole: a
prompt's media, or the targets of a parallel head (never fed back). A sequential
head feeds its features back one at a time, and bidirectional context would
leak each target into the positions that predict it; MultimodalLM refuses that
pairing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence, unpad_sequence

from mllm.registry import Registry

PROJECTORS: Registry[nn.Module] = Registry("projector")


def list_projectors() -> list[str]:
    return PROJECTORS.names()


def sees_items(projector: nn.Module) -> bool:
    """Whether `projector` is called as projector(features [n, D], lengths), one length per item."""
    return getattr(projector, "sees_items", False)


@PROJECTORS.register("linear")
def linear(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim)


@PROJECTORS.register("mlp2x_gelu")
def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA-1.5's projector: Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


@PROJECTORS.register("context_gru")
class ContextGRU(nn.Module):
    """Linear -> + bidirectional GRU over the item's tokens (a residual) -> GELU -> Linear.

    A token-wise projector hands a small LM each token alone, and the LM must
    find "the third spoken digit" in a run of look-alike tokens by attention
    only. Here every token also carries its neighbourhood and its place in the
    item, in both directions, as a speech recogniser's encoder would.
    """

    sees_items = True

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if out_dim % 2:
            raise ValueError(f"context_gru needs an even LM hidden size (two directions of half each), got {out_dim}")
        self.proj_in = nn.Linear(in_dim, out_dim)
        self.gru = nn.GRU(out_dim, out_dim // 2, batch_first=True, bidirectional=True)
        self.proj_out = nn.Sequential(nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, features: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """features [n, D], lengths: each item's token count, in reading order (sum n) -> [n, H]."""
        if sum(lengths) != features.shape[0] or min(lengths, default=1) < 1:
            raise ValueError(f"item lengths {lengths} do not split {features.shape[0]} feature rows")
        x = self.proj_in(features)  # [n, H]
        packed = self.gru(pack_sequence(x.split(lengths), enforce_sorted=False))[0]
        context, _ = pad_packed_sequence(packed, batch_first=True)  # [I, L, H], both directions
        context = torch.cat(unpad_sequence(context, torch.tensor(lengths), batch_first=True))  # [n, H]
        return self.proj_out(x + context)
