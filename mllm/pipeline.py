"""Pipeline: conversations in, interleaved text and media out.

    pipe = Pipeline.from_pretrained("runs/x/checkpoint")
    [reply] = pipe.chat([messages], GenerationConfig(max_new_tokens=128))
    reply   # ["Here is a 3: ", Image(...), " and it sounds like ", Audio(...)]
    pipe.transcribe([[{"role": "user", "content": [{"type": "audio", "media": clip}, {"type": "text", "text": "Transcribe."}]}]])
            # ["zero nine"]: joint CTC/attention decoding where the model learned to spell its slots
    pipe.reply_logprobs([messages], ["yes"])   # [(log p(yes | messages), whether greedy writes it)]

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
from mllm.generation import GenerationConfig, MediaSpan, ctc_log_likelihood, ctc_prefix_beam_search, generate
from mllm.media import Audio, Image, Video
from mllm.model import MultimodalLM
from mllm.processor import Processor
from mllm.sequence import IGNORE_INDEX, MultimodalBatch

Media = Image | Audio | Video
Item = str | Media
CTC_WEIGHT = 0.3  # w of joint CTC/attention transcription, chosen on the embedded default's validation split


def check_joint_decoding(ctc_weight: float, ctc_beam: int) -> None:
    if not 0 <= ctc_weight <= 1 or ctc_beam < 1:
        raise ValueError(f"need 0 <= ctc_weight <= 1 and ctc_beam >= 1, got {ctc_weight} and {ctc_beam}")


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
        on_finish: Callable[[int, str, int], None] | None = None,
    ) -> list[list[Item]]:
        """The assistant's next turn for each conversation, as text and decoded media in order.

        `force` ("image" | "audio" | "video") opens the reply with that modality's begin
        token, so it starts with a medium (text-to-image and the like). `decode_guidance` and
        `decode_steps` go to the de-tokenizers; None: each de-tokenizer's saved default.
        `on_finish(row, reason, tokens)` learns why each reply ended, "eos", "stop", or "length" (out of
        `max_new_tokens`, a medium left unfinished is dropped), and how many tokens it generated (every
        position counts, as against `max_new_tokens`: text, media markers and slots; not the end token).
        """
        config = self._defaults(config or GenerationConfig())
        if force is not None and config.writes is not None and force not in config.writes:
            raise ValueError(f"force={force!r}: the reply may not write it (config.writes {config.writes})")
        batch = self._prompts(conversations, force)
        uncond = None
        if config.guided:
            uncond = self._prompts([[{"role": "user", "content": ""}]] * len(conversations), force)
        decoded: dict[int, Media] = {}  # id(span) -> medium, decoded once as each span completes
        # the de-tokenizers' draws come from the generation's seed too: a seeded reply's media are the same each run
        rng = None if config.seed is None else torch.Generator().manual_seed(config.seed)

        def media_callback(row: int, span: MediaSpan) -> None:
            decoded[id(span)] = self.decode(span, guidance=decode_guidance, steps=decode_steps, generator=rng)
            if on_media is not None:
                on_media(row, decoded[id(span)])

        results = generate(
            self.model, batch, config, uncond=uncond, decode_text=self.processor.decode_text,
            on_text=on_text, on_media=media_callback,
        )
        if on_finish is not None:
            for row, result in enumerate(results):
                on_finish(row, result.finish_reason, len(result.ids))

        def item(i: str | MediaSpan) -> Item:
            if isinstance(i, str):
                return i
            if id(i) not in decoded:
                decoded[id(i)] = self.decode(i, guidance=decode_guidance, steps=decode_steps, generator=rng)
            return decoded[id(i)]

        return [[item(i) for i in result.items(self.processor.decode_text)] for result in results]

    def generate_media(self, conversations: Sequence[list[dict]], modality: str, **kwargs) -> list[Media | None]:
        """One medium per conversation (the first the reply holds), for text-to-X evaluation; None where the
        reply holds none (its medium was cut by max_new_tokens): one prompt's failure is its own."""
        replies = self.chat(conversations, force=modality, **kwargs)
        return [next((item for item in reply if not isinstance(item, str)), None) for reply in replies]

    def decode(self, span: MediaSpan, *, guidance: float | None = None, steps: int | None = None,
               generator: torch.Generator | None = None) -> Media:
        if span.modality not in self.detokenizers:
            raise KeyError(f"no {span.modality} de-tokenizer in this pipeline (has: {sorted(self.detokenizers)})")
        return self.detokenizers[span.modality].decode(span.tokens, guidance=guidance, steps=steps, generator=generator)

    def complete(self, conversations: Sequence[list[dict]], max_new_tokens: int) -> list[str]:
        """The assistant's greedy text reply to each conversation, decoded and stripped."""
        return self._greedy(self._prompts(conversations, None), max_new_tokens)

    @torch.no_grad()
    def transcribe(self, conversations: Sequence[list[dict]], *, max_new_tokens: int = 96,
                   ctc_weight: float = CTC_WEIGHT, ctc_beam: int = 8) -> list[str]:
        """What each conversation's last user turn's medium says. Where that turn holds one medium and the model
        learned to spell its slots (`config.transcribed`), joint CTC/attention decoding (Watanabe et al. 2017;
        rescoring as in WeNet): the greedy reply and the slots' CTC n-best are the candidates, and the one with
        the highest (1 - w) log p_LM(reply | conversation) + w log p_CTC(reply | slots) wins, w = `ctc_weight`.
        Other conversations, and every one at w = 0, get the greedy reply."""
        check_joint_decoding(ctc_weight, ctc_beam)
        batch = self._prompts(conversations, None)  # validates the messages; read once for both readings
        replies = self._greedy(batch, max_new_tokens)
        spelled = {k: m for k, c in enumerate(conversations) if (m := self._spelled_medium(c))}
        if ctc_weight == 0 or not spelled:
            return replies
        inputs = {k: v for k, v in batch.model_inputs().items() if k not in ("labels", "feature_targets")}
        logits = self.model(**inputs, logits_to_keep=0).logits  # [B, T, V]
        w = ctc_weight
        for k, modality in spelled.items():
            slots = self.processor.layout[modality]
            ids = batch.input_ids[k]
            begin = int((ids == slots.begin_id).nonzero()[-1])  # the turn's medium is the prompt's last of its kind
            at = (ids == slots.placeholder_id) & (torch.arange(len(ids), device=ids.device) > begin)
            log_probs = logits[k, at].float().log_softmax(-1)  # [L, V]: the medium's slots
            nbest = ctc_prefix_beam_search(log_probs, slots.placeholder_id, beam=ctc_beam)
            candidates = [replies[k]] + [self.processor.decode_text(c).strip() for c, _ in nbest]
            candidates = [c for c in dict.fromkeys(candidates) if c]
            if not candidates:
                continue
            lm = [logprob for logprob, _ in self.reply_logprobs([conversations[k]] * len(candidates), candidates)]
            ctc = [ctc_log_likelihood(log_probs, self.processor.tokenizer(c, add_special_tokens=False)["input_ids"],
                                      slots.placeholder_id) for c in candidates]
            replies[k] = max(zip(candidates, lm, ctc), key=lambda c: (1 - w) * c[1] + w * c[2])[0]
        return replies

    @torch.no_grad()
    def reply_logprobs(self, conversations: Sequence[list[dict]], replies: Sequence[str], *,
                       rows_per_forward: int = 8) -> list[tuple[float, bool]]:
        """For each conversation, log p(assistant reply | conversation), summed over the reply's labelled
        tokens (its text and end of turn), and whether greedy decoding would have written exactly them.
        Earlier assistant turns are labelled too, but are the conversation's, not the reply's."""
        if len(conversations) != len(replies):
            raise ValueError(f"{len(conversations)} conversations but {len(replies)} replies")
        out: list[tuple[float, bool]] = []
        for start in range(0, len(conversations), rows_per_forward):
            chunk = [
                list(c) + [{"role": "assistant", "content": [{"type": "text", "text": r}]}]
                for c, r in zip(conversations[start:start + rows_per_forward], replies[start:start + rows_per_forward])
            ]
            batch = self.processor(chunk, padding_side="right").to(self.device)
            inputs = {k: v for k, v in batch.model_inputs().items() if k not in ("labels", "feature_targets")}
            logits = self.model(**inputs).logits[:, :-1].float()  # position t predicts token t + 1
            labels = batch.labels[:, 1:]
            mask = _last_run(labels.ne(IGNORE_INDEX))
            picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            greedy = logits.argmax(-1).eq(labels) | ~mask
            out += [(float(s), bool(g)) for s, g in zip((picked * mask).sum(-1), greedy.all(-1))]
        return out

    @torch.no_grad()
    def _greedy(self, batch: MultimodalBatch, max_new_tokens: int) -> list[str]:
        results = generate(self.model, batch, self._defaults(GenerationConfig(max_new_tokens=max_new_tokens)))
        return [self.processor.decode_text(result.ids).strip() for result in results]

    def _spelled_medium(self, conversation: list[dict]) -> str | None:
        """The modality of the last user turn's only medium (messages already validated), if the model learned to
        spell it."""
        users = [m for m in conversation if m["role"] == "user"]
        content = users[-1]["content"] if users else ""
        media = [p["type"] for p in content if p["type"] != "text"] if isinstance(content, list) else []
        return media[0] if len(media) == 1 and media[0] in self.model.config.transcribed else None

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
        if config.eos_token_id is None:  # the end of turn training labelled (e.g. ChatML's <|im_end|>), and eos
            end, eos = self.processor.end_of_turn_id, self.processor.tokenizer.eos_token_id
            stops = [*config.stop_token_ids, *([eos] if eos not in (None, end) else [])]
            config = replace(config, eos_token_id=end, stop_token_ids=stops)
        if config.pad_token_id is None:
            config = replace(config, pad_token_id=self.processor.pad_id)
        return config


def _last_run(labelled: torch.Tensor) -> torch.Tensor:
    """[B, T] bool -> the same with only each row's last run of True kept: the final turn's tokens."""
    at = torch.arange(labelled.shape[1], device=labelled.device)
    end = torch.where(labelled, at, -1).amax(-1, keepdim=True)  # [B, 1]: the run's last position
    start = torch.where(~labelled & (at < end), at, -1).amax(-1, keepdim=True)  # the last False before it
    return labelled & (at > start)
