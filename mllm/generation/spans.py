"""Media spans in generated output: which ids may come next, and when a span must end.

    text ... <m>  c_1 ... c_N  </m>  text ...        discrete: N codes from m's code range
    text ... <m>  f_1 ... f_N  </m>  text ...        continuous: N features from m's head

Outside a span the text logits may not pick codes, placeholders or end
tokens, nor begin tokens of modalities the model cannot write (continuous
ones without a head) or the reply may not (`writes`). Inside a discrete span they are restricted to the
modality's codes; after N of them the end token is forced. With N = 0 the
model ends the span itself: the end token joins the allowed set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mllm.model import MultimodalLM


@dataclass(frozen=True)
class SpanRule:
    """How generation writes one modality's span."""

    modality: str
    continuous: bool
    begin_id: int
    end_id: int
    placeholder_id: int  # continuous only
    code_range: tuple[int, int]  # discrete only: [start, stop) of the code ids
    length: int  # N; 0: the model ends the (discrete) span
    parallel: bool  # continuous: the whole span from one forward pass over N queries


class SpanRules:
    def __init__(self, model: MultimodalLM, vocab_size: int, device: torch.device, writes: list[str] | None = None):
        """`writes`: the modalities a reply may open (None: every one the model can write)."""
        if writes is not None and (unknown := sorted(set(writes) - set(model.layout.modalities))):
            raise ValueError(f"writes: {unknown[0]!r} is no modality of this model (it has "
                             f"{sorted(model.layout.modalities)})")
        self.rules: list[SpanRule] = []
        self.text_allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
        self.code_allowed: dict[str, torch.Tensor] = {}
        for name, m in model.layout.modalities.items():
            continuous = m.spec.kind == "continuous"
            length = model.config.tokens_per_item.get(name, 0)
            start, stop = m.code_range
            self.text_allowed[[m.end_id] + ([m.placeholder_id] if continuous else [])] = False
            self.text_allowed[start:stop] = False
            if (continuous and name not in model.heads) or (writes is not None and name not in writes):
                self.text_allowed[m.begin_id] = False  # an input-only modality, or one this reply may not write
                continue
            if continuous and length == 0:
                raise ValueError(f"{name} has an output head but tokens_per_item is 0: set the features per item")
            parallel = model.is_parallel(name)
            rule = SpanRule(name, continuous, m.begin_id, m.end_id, m.placeholder_id, (start, stop), length, parallel)
            self.rules.append(rule)
            if not continuous:
                allowed = torch.zeros(vocab_size, dtype=torch.bool, device=device)
                allowed[start:stop] = True
                allowed[m.end_id] = length == 0
                self.code_allowed[name] = allowed
        self.by_begin = {r.begin_id: r for r in self.rules}

    @property
    def continuous(self) -> list[SpanRule]:
        return [r for r in self.rules if r.continuous]

    @property
    def discrete(self) -> list[SpanRule]:
        return [r for r in self.rules if not r.continuous]

    def is_body(self, rule: SpanRule, token: int) -> bool:
        """Whether `token` is a code or placeholder of `rule`'s span."""
        if rule.continuous:
            return token == rule.placeholder_id
        return rule.code_range[0] <= token < rule.code_range[1]

    def open_span(self, ids: list[int]) -> tuple[SpanRule, int] | None:
        """The span a prompt ends inside, with the number of its tokens already given; None if it ends in text."""
        for rule in self.rules:
            count = 0
            while count < len(ids) and self.is_body(rule, ids[-1 - count]):
                count += 1
            if count < len(ids) and ids[-1 - count] == rule.begin_id:
                return rule, count
        return None
