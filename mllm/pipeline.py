"""Pipeline: conversations in, interleaved text and media out.

    pipe = Pipeline.from_pretrained("runs/x/checkpoint")
    [reply] = pipe.chat([messages], GenerationConfig(max_new_tokens=128))
    reply   # ["Here is a 3: ", Image(...), " and it sounds like ", Audio(...)]

It joins the layers below: the processor renders the conversation, the
generation engine continues it, and each generated media span goes to its
modality's de-tokenizer. Classifier-free guidance gets its unconditional
prompts here (the chat frame with an empty user turn), since only this layer
knows both the processor and the engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from mllm.checkpoint import load_checkpoint, load_detokenizers, save_checkpoint
from mllm.detokenizers import DeTokenizer
from mllm.generation import GenerationConfig, MediaSpan, generate
from mllm.media import Audio, Image, Video
from mllm.model import MultimodalLM
from mllm.processor import Processor
from mllm.sequence import MultimodalBatch

Media = Image | Audio | Video
Item = str | Media


class Pipeline:
    def __init__(self, model: MultimodalLM, processor: Processor, detokenizers: dict[str, DeTokenizer] | None = None):
        self.model, self.processor = model.eval(), processor
        self.detokenizers = dict(detokenizers or {})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | None = None) -> "Pipeline":
        model, processor = load_checkpoint(path, device=device)
        detokenizers = {m: d.to(device) if device else d for m, d in load_detokenizers(path).items()}
        return cls(model, processor, detokenizers)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        save_checkpoint(self.model, self.processor, path, self.detokenizers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def chat(
        self,
        conversations: Sequence[list[dict]],
        config: GenerationConfig | None = None,
        *,
        force: str | None = None,
        decode_guidance: float | None = None,
        decode_steps: int | None = None,
        on_text: Callable[[int, str], None] | None = None,
        on_media: Callable[[int, Media], None] | None = None,
    ) -> list[list[Item]]:
        """The assistant's next turn for each conversation, as text and decoded media in order.

        `force` ("image" | "audio" | "video") opens the reply with that modality's begin
        token, so it starts with a medium (text-to-image and the like). `decode_guidance` and
        `decode_steps` go to the de-tokenizers; None: each de-tokenizer's saved default.
        """
        config = self._defaults(config or GenerationConfig())
        batch = self._prompts(conversations, force)
        uncond = None
        if config.guided:
            uncond = self._prompts([[{"role": "user", "content": ""}]] * len(conversations), force)
        decoded: dict[int, Media] = {}  # id(span) -> medium, decoded once as each span completes

        def media_callback(row: int, span: MediaSpan) -> None:
            decoded[id(span)] = self.decode(span, guidance=decode_guidance, steps=decode_steps)
            if on_media is not None:
                on_media(row, decoded[id(span)])

        results = generate(
            self.model, batch, config, uncond=uncond, decode_text=self.processor.decode_text,
            on_text=on_text, on_media=media_callback,
        )

        def item(i: str | MediaSpan) -> Item:
            if isinstance(i, str):
                return i
            return decoded[id(i)] if id(i) in decoded else self.decode(i, guidance=decode_guidance, steps=decode_steps)

        return [[item(i) for i in result.items(self.processor.decode_text)] for result in results]

    def generate_media(self, conversations: Sequence[list[dict]], modality: str, **kwargs) -> list[Media]:
        """One medium per conversation (the first the reply holds); for text-to-X evaluation."""
        media = []
        for row, reply in enumerate(self.chat(conversations, force=modality, **kwargs)):
            found = [item for item in reply if not isinstance(item, str)]
            if not found:
                raise RuntimeError(f"conversation {row}: the model wrote no {modality} (reply: {reply!r})")
            media.append(found[0])
        return media

    def decode(self, span: MediaSpan, *, guidance: float | None = None, steps: int | None = None) -> Media:
        if span.modality not in self.detokenizers:
            raise KeyError(f"no {span.modality} de-tokenizer in this pipeline (has: {sorted(self.detokenizers)})")
        return self.detokenizers[span.modality].decode(span.tokens, guidance=guidance, steps=steps)

    def _prompts(self, conversations: Sequence[list[dict]], force: str | None) -> MultimodalBatch:
        batch = self.processor(list(conversations), add_generation_prompt=True, padding_side="left")
        if force is not None:
            begin = torch.full((batch.input_ids.shape[0], 1), self.processor.layout[force].begin_id)
            batch = replace(
                batch,
                input_ids=torch.cat([batch.input_ids, begin], dim=1),
                attention_mask=torch.cat([batch.attention_mask, torch.ones_like(begin)], dim=1),
                labels=None,
            )
        return batch.to(self.device)

    def _defaults(self, config: GenerationConfig) -> GenerationConfig:
        tokenizer = self.processor.tokenizer
        if config.eos_token_id is None:
            config = replace(config, eos_token_id=tokenizer.eos_token_id)
        if config.pad_token_id is None:
            config = replace(config, pad_token_id=self.processor.pad_id)
        return config
