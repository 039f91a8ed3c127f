"""VocabLayout: where media tokens live in the LM's vocabulary.

Each modality gets real added tokens (never sentinel ids):

    <image> <image:0> ... <image:8191> </image>      discrete: one token per code
    <image> <image:feat> ... <image:feat> </image>  continuous: one placeholder per slot

Code tokens of one modality are added in one call, so their ids are contiguous
and `code_offset + code` maps a code to its id without a lookup table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

MODALITIES = ("image", "video", "audio")
Kind = Literal["discrete", "continuous"]


@dataclass(frozen=True)
class ModalitySpec:
    """What the LM needs to know about one modality's tokens."""

    name: str
    kind: Kind
    codebook_size: int = 0  # discrete: number of codes
    feature_dim: int = 0  # continuous: width of one feature vector

    def __post_init__(self):
        if self.name not in MODALITIES:
            raise ValueError(f"modality '{self.name}' is not one of {MODALITIES}")
        if self.kind == "discrete" and self.codebook_size <= 0:
            raise ValueError(f"{self.name}: a discrete modality needs codebook_size > 0")
        if self.kind == "continuous" and self.feature_dim <= 0:
            raise ValueError(f"{self.name}: a continuous modality needs feature_dim > 0")
        if self.kind not in ("discrete", "continuous"):
            raise ValueError(f"{self.name}: kind must be 'discrete' or 'continuous', got '{self.kind}'")

    @property
    def begin_token(self) -> str:
        return f"<{self.name}>"

    @property
    def end_token(self) -> str:
        return f"</{self.name}>"

    @property
    def placeholder_token(self) -> str:
        return f"<{self.name}:feat>"

    def code_token(self, code: int) -> str:
        return f"<{self.name}:{code}>"


@dataclass(frozen=True)
class ModalityIds:
    """Token ids assigned to one modality once its tokens are in the tokenizer."""

    spec: ModalitySpec
    begin_id: int
    end_id: int
    placeholder_id: int = -1  # continuous only
    code_offset: int = -1  # discrete only: id of code 0

    @property
    def code_range(self) -> tuple[int, int]:
        """[start, stop) of the code ids; empty for a continuous modality."""
        if self.spec.kind != "discrete":
            return (0, 0)
        return (self.code_offset, self.code_offset + self.spec.codebook_size)


@dataclass(frozen=True)
class VocabLayout:
    """The text vocabulary plus every modality's added tokens."""

    text_vocab_size: int  # len(tokenizer) before any media token was added
    modalities: dict[str, ModalityIds] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        ids = [self.text_vocab_size - 1]
        for m in self.modalities.values():
            ids += [m.begin_id, m.end_id, m.placeholder_id, m.code_range[1] - 1]
        return max(ids) + 1

    def __getitem__(self, name: str) -> ModalityIds:
        try:
            return self.modalities[name]
        except KeyError:
            raise KeyError(f"modality '{name}' is not in this vocabulary (has: {sorted(self.modalities)})") from None

    @classmethod
    def extend(cls, tokenizer, specs: list[ModalitySpec]) -> "VocabLayout":
        """Add every modality's tokens to a HF `tokenizer` (in place) and return their ids."""
        from tokenizers import AddedToken  # a transformers dependency

        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate modality in {names}")
        text_vocab_size = len(tokenizer)

        def add(tokens: list[str]) -> list[int]:
            vocab = tokenizer.get_vocab()
            existing = [t for t in tokens if t in vocab]
            if existing:
                raise ValueError(f"tokenizer already has media token '{existing[0]}'; extend a plain text tokenizer")
            first = len(tokenizer)
            tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)
            ids = tokenizer.convert_tokens_to_ids(tokens)
            if ids != list(range(first, first + len(tokens))):
                raise RuntimeError(f"added tokens {tokens[0]}... did not get contiguous ids starting at {first}")
            return ids

        modalities = {}
        for s in specs:
            markers = [s.begin_token, s.end_token] + ([s.placeholder_token] if s.kind == "continuous" else [])
            marker_ids = add(markers)
            codes = add([s.code_token(c) for c in range(s.codebook_size)]) if s.kind == "discrete" else [-1]
            modalities[s.name] = ModalityIds(
                spec=s,
                begin_id=marker_ids[0],
                end_id=marker_ids[1],
                placeholder_id=marker_ids[2] if s.kind == "continuous" else -1,
                code_offset=codes[0],
            )
        return cls(text_vocab_size=text_vocab_size, modalities=modalities)

    def code_ids(self, name: str, codes: torch.Tensor) -> torch.Tensor:
        """Codes [N] in [0, codebook_size) -> token ids [N]; out-of-range codes raise."""
        m = self[name]
        if m.spec.kind != "discrete":
            raise ValueError(f"{name} is continuous: it has placeholders, not codes")
        if codes.dtype.is_floating_point or codes.dim() != 1:
            raise ValueError(f"{name}: codes must be a 1-D integer tensor, got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= m.spec.codebook_size):
            bad = codes[(codes < 0) | (codes >= m.spec.codebook_size)][0].item()
            raise ValueError(f"{name}: code {bad} is outside [0, {m.spec.codebook_size})")
        return codes.long() + m.code_offset

    def to_dict(self) -> dict:
        return {"text_vocab_size": self.text_vocab_size, "modalities": [asdict(m) for m in self.modalities.values()]}

    @classmethod
    def from_dict(cls, data: dict) -> "VocabLayout":
        modalities = {}
        for m in data.get("modalities", []):
            ids = ModalityIds(**{**m, "spec": ModalitySpec(**m["spec"])})
            modalities[ids.spec.name] = ids
        return cls(text_vocab_size=data["text_vocab_size"], modalities=modalities)
