"""The model side of an evaluation: answers, option likelihoods and generated media, a batch at a time.

    predictor = ModelPredictor(model, processor)
    predictor.answer(items, max_new_tokens=16)      # -> ["yes", "7", ...]      greedy, batched, left-padded
    predictor.transcribe(items, max_new_tokens=96)  # -> ["zero nine", ...]    joint CTC/attention where it can
    predictor.choice_logprobs(items)                # -> [[-3.1, -0.2], ...]    log p(option | question) per option
    predictor.generate_media(items, "image")        # -> [Image, ...]           via the media generator, if connected

The runner talks to any object with these four methods (`Predictor`), so a
fake one can stand in for a model in tests, and other backends can plug in.
`generate_text_ids` is the one place that calls the generation engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from mllm.eval.tasks import Item, Modality
from mllm.generation import ctc_log_likelihood, ctc_prefix_beam_search, greedy_generate
from mllm.media import Audio, Image, Video
from mllm.model import MultimodalLM
from mllm.processor import Processor
from mllm.sequence import IGNORE_INDEX, MultimodalBatch

Media = Image | Audio | Video
CTC_WEIGHT = 0.3  # chosen on the embedded default's validation split (docs/default_model.md)
MediaGenerator = Callable[[list[list[dict]], Modality], list[Media]]  # (conversations, modality) -> one item each


class Predictor(Protocol):
    def answer(self, items: Sequence[Item], max_new_tokens: int) -> list[str]: ...

    def transcribe(self, items: Sequence[Item], max_new_tokens: int) -> list[str]: ...

    def choice_logprobs(self, items: Sequence[Item]) -> list[list[float]]: ...

    def generate_media(self, items: Sequence[Item], modality: Modality) -> list[Media]: ...


class NoMediaGenerator(RuntimeError):
    """A generation task on a predictor with no media generator connected."""


def generate_text_ids(model: MultimodalLM, batch: MultimodalBatch, max_new_tokens: int, eos_token_id: int) -> list[list[int]]:
    """Greedy continuation ids of each left-padded prompt, without the eos."""
    return greedy_generate(model, batch, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)


class ModelPredictor:
    """An mllm model and its processor. `rows_per_forward` bounds the rows of one likelihood pass
    (each item contributes one row per option). `ctc_weight` is w of the joint CTC/attention score
    of `transcribe` (0: greedy answers only), `ctc_beam` the CTC n-best it rescores."""

    def __init__(
        self,
        model: MultimodalLM,
        processor: Processor,
        *,
        media_generator: MediaGenerator | None = None,
        rows_per_forward: int = 8,
        ctc_weight: float = CTC_WEIGHT,
        ctc_beam: int = 8,
    ):
        if not 0 <= ctc_weight <= 1 or ctc_beam < 1:
            raise ValueError(f"need 0 <= ctc_weight <= 1 and ctc_beam >= 1, got {ctc_weight} and {ctc_beam}")
        self.model, self.processor = model.eval(), processor
        self.media_generator = media_generator
        self.rows_per_forward = rows_per_forward
        self.ctc_weight, self.ctc_beam = ctc_weight, ctc_beam
        eos = processor.tokenizer.eos_token_id
        self.eos_token_id = eos if eos is not None else -1  # -1: never stop early

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def answer(self, items: Sequence[Item], max_new_tokens: int) -> list[str]:
        return self.complete([i.messages() for i in items], max_new_tokens)

    @torch.no_grad()
    def complete(self, conversations: Sequence[list[dict]], max_new_tokens: int) -> list[str]:
        """The assistant's greedy reply to each conversation, decoded and stripped."""
        batch = self.processor(list(conversations), add_generation_prompt=True, padding_side="left")
        ids = generate_text_ids(self.model, batch.to(self.device), max_new_tokens, self.eos_token_id)
        return [self.processor.decode_text(row).strip() for row in ids]

    @torch.no_grad()
    def transcribe(self, items: Sequence[Item], max_new_tokens: int) -> list[str]:
        """What each item's medium says. For an item with one medium whose slots the model learned to spell
        (`config.transcribed`), joint CTC/attention decoding (Watanabe et al. 2017; rescoring as in WeNet):
        the greedy reply and the slots' CTC n-best are the candidates, and the one with the highest
        (1 - w) log p_LM(reply | prompt) + w log p_CTC(reply | slots) wins. Other items get the greedy reply."""
        replies = self.answer(items, max_new_tokens)
        spelled = set(self.model.config.transcribed)
        rows = [k for k, item in enumerate(items) if len(item.media) == 1 and item.media[0].type in spelled]
        if self.ctc_weight == 0 or not rows:
            return replies
        conversations = [items[k].messages() for k in rows]
        batch = self.processor(conversations, add_generation_prompt=True, padding_side="left").to(self.device)
        inputs = {k: v for k, v in batch.model_inputs().items() if k not in ("labels", "feature_targets")}
        logits = self.model(**inputs, logits_to_keep=0).logits  # [B, T, V]
        w = self.ctc_weight
        for row, k in enumerate(rows):
            blank = self.model.layout[items[k].media[0].type].placeholder_id
            log_probs = logits[row, batch.input_ids[row] == blank].float().log_softmax(-1)  # [L, V]: the slots
            nbest = ctc_prefix_beam_search(log_probs, blank, beam=self.ctc_beam)
            candidates = [replies[k]] + [self.processor.decode_text(ids).strip() for ids, _ in nbest]
            candidates = [c for c in dict.fromkeys(candidates) if c]
            if not candidates:
                continue
            lm = [logprob for logprob, _ in self.reply_logprobs([conversations[row]] * len(candidates), candidates)]
            ctc = [ctc_log_likelihood(log_probs, self.processor.tokenizer(c, add_special_tokens=False)["input_ids"],
                                      blank) for c in candidates]
            replies[k] = max(zip(candidates, lm, ctc), key=lambda c: (1 - w) * c[1] + w * c[2])[0]
        return replies

    def choice_logprobs(self, items: Sequence[Item]) -> list[list[float]]:
        conversations, replies = [], []
        for item in items:
            if not item.choices:
                raise ValueError(f"item {item.id}: no options to score")
            for choice in item.choices:
                conversations.append(item.messages())
                replies.append(choice)
        scores = [logprob for logprob, _ in self.reply_logprobs(conversations, replies)]
        out, start = [], 0
        for item in items:
            out.append(scores[start:start + len(item.choices)])
            start += len(item.choices)
        return out

    @torch.no_grad()
    def reply_logprobs(self, conversations: Sequence[list[dict]], replies: Sequence[str]) -> list[tuple[float, bool]]:
        """For each conversation, log p(assistant reply | conversation), summed over the reply's labelled
        tokens (its text and end of turn), and whether greedy decoding would have written exactly them."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(conversations), self.rows_per_forward):
            chunk = [
                list(c) + [{"role": "assistant", "content": [{"type": "text", "text": r}]}]
                for c, r in zip(conversations[start:start + self.rows_per_forward], replies[start:start + self.rows_per_forward])
            ]
            batch = self.processor(chunk, padding_side="right").to(self.device)
            inputs = {k: v for k, v in batch.model_inputs().items() if k not in ("labels", "feature_targets")}
            logits = self.model(**inputs).logits[:, :-1].float()  # position t predicts token t + 1
            labels = batch.labels[:, 1:]
            mask = labels.ne(IGNORE_INDEX)
            picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            greedy = logits.argmax(-1).eq(labels) | ~mask
            out += [(float(s), bool(g)) for s, g in zip((picked * mask).sum(-1), greedy.all(-1))]
        return out

    def generate_media(self, items: Sequence[Item], modality: Modality) -> list[Media]:
        if self.media_generator is None:
            raise NoMediaGenerator(
                f"this model has no {modality} generator connected, so generation tasks cannot run "
                "(ModelPredictor(media_generator=...) connects one)"
            )
        media = self.media_generator([i.messages() for i in items], modality)
        if len(media) != len(items):
            raise RuntimeError(f"the media generator returned {len(media)} items for {len(items)} prompts")
        return media
