"""The model side of an evaluation: answers, option likelihoods and generated media, a batch at a time.

    predictor = ModelPredictor(model, processor)
    predictor.answer(items, max_new_tokens=16)      # -> ["yes", "7", ...]      greedy, batched, left-padded
    predictor.transcribe(items, max_new_tokens=96)  # -> ["zero nine", ...]    joint CTC/attention where it can
    predictor.choice_logprobs(items)                # -> [[-3.1, -0.2], ...]    log p(option | question) per option
    predictor.generate_media(items, "image")        # -> [Image, None, ...]     via the media generator, if connected

The runner talks to any object with these four methods (`Predictor`), so a
fake one can stand in for a model in tests, and other backends can plug in.
`ModelPredictor` is a thin adapter: the decoding and scoring live in `Pipeline`,
which `mllm chat`, `mllm serve` and `mllm demo` share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from mllm.errors import InputError
from mllm.eval.tasks import Item, Modality
from mllm.media import Audio, Image, Video
from mllm.model import MultimodalLM
from mllm.pipeline import CTC_WEIGHT, Pipeline, check_joint_decoding
from mllm.processor import Processor

Media = Image | Audio | Video
# (conversations, modality) -> one medium each, None where the model wrote none
MediaGenerator = Callable[[list[list[dict]], Modality], list[Media | None]]


class Predictor(Protocol):
    def answer(self, items: Sequence[Item], max_new_tokens: int) -> list[str]: ...

    def transcribe(self, items: Sequence[Item], max_new_tokens: int) -> list[str]: ...

    def choice_logprobs(self, items: Sequence[Item]) -> list[list[float]]: ...

    def generate_media(self, items: Sequence[Item], modality: Modality) -> list[Media | None]: ...


class NoMediaGenerator(InputError, RuntimeError):
    """A generation task on a predictor with no media generator connected."""


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
        check_joint_decoding(ctc_weight, ctc_beam)
        self.pipeline = Pipeline(model, processor)
        self.model, self.processor = self.pipeline.model, processor
        self.media_generator = media_generator
        self.rows_per_forward = rows_per_forward
        self.ctc_weight, self.ctc_beam = ctc_weight, ctc_beam

    def answer(self, items: Sequence[Item], max_new_tokens: int) -> list[str]:
        return self.complete([i.messages() for i in items], max_new_tokens)

    def complete(self, conversations: Sequence[list[dict]], max_new_tokens: int) -> list[str]:
        """The assistant's greedy reply to each conversation, decoded and stripped."""
        return self.pipeline.complete(conversations, max_new_tokens)

    def transcribe(self, items: Sequence[Item], max_new_tokens: int) -> list[str]:
        """What each item's medium says: `Pipeline.transcribe` (joint CTC/attention decoding where it can)."""
        return self.pipeline.transcribe([i.messages() for i in items], max_new_tokens=max_new_tokens,
                                        ctc_weight=self.ctc_weight, ctc_beam=self.ctc_beam)

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

    def reply_logprobs(self, conversations: Sequence[list[dict]], replies: Sequence[str]) -> list[tuple[float, bool]]:
        """`Pipeline.reply_logprobs`, `rows_per_forward` rows at a time."""
        return self.pipeline.reply_logprobs(conversations, replies, rows_per_forward=self.rows_per_forward)

    def generate_media(self, items: Sequence[Item], modality: Modality) -> list[Media | None]:
        if self.media_generator is None:
            raise NoMediaGenerator(
                f"this model has no {modality} generator connected, so generation tasks cannot run "
                "(ModelPredictor(media_generator=...) connects one)"
            )
        media = self.media_generator([i.messages() for i in items], modality)
        if len(media) != len(items):
            raise RuntimeError(f"the media generator returned {len(media)} items for {len(items)} prompts")
        return media
