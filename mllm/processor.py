"""Processor: messages -> token ids, continuous features and labels.

Messages use the OpenAI/HF content-list form:

    [{"role": "user", "content": [{"type": "image", "path": "cat.png"},
                                  {"type": "text", "text": "What is this?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]

A media part names its medium by exactly one of: `path` (relative to
`base_dir`), `bytes` (raw or base64), `media` (an Image/Audio/Video), the
modality's own key (`"image": ...`, HF style), or `tokens` (already encoded,
e.g. from the token cache). Raw bytes may come under any key but `tokens`,
base64 text only under `bytes`. Each becomes a span

    <image> c_1 ... c_N </image>                       discrete codes as added tokens
    <image> <image:feat> x N </image>   + features [N, D]  continuous

Only assistant content is labelled: its text, its code spans and its end of
turn. Continuous slots in assistant turns are flagged as feature targets.

A continuous medium in a user turn may say what is spoken in it,
`{"type": "audio", "path": "q.wav", "transcript": "three six zero"}`; with
`encode(..., transcripts=True)` its token ids go into `Sample.transcripts`,
the targets of the training loop's CTC term (`loss.transcripts`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mllm.chat_template import ChatTemplate, chat_template_from_dict, get_chat_template
from mllm.errors import InputError
from mllm.media import Audio, Image, Video, load_media
from mllm.sequence import IGNORE_INDEX, MultimodalBatch, Sample, pad_collate
from mllm.tokenizers import MediaTokenizer, load_media_tokenizer
from mllm.vocab import MODALITIES, ModalitySpec, VocabLayout

CONFIG_FILE = "mllm_processor.json"
MEDIA_TOKENIZERS_DIR = "media_tokenizers"  # beside CONFIG_FILE: one saved media tokenizer per modality
ROLES = ("system", "user", "assistant")
MEDIA_TYPES = {"image": Image, "audio": Audio, "video": Video}
SOURCE_KEYS = ("tokens", "path", "bytes", "media")
NOTE_KEYS = ("transcript",)  # what a media part says about its medium, kept when its source is swapped


class MessageError(InputError, ValueError):
    """A malformed message; the text names where, e.g. `messages[1].content[0]`."""


class SequenceTooLongError(InputError, ValueError):
    """A conversation that tokenizes to more than the processor's `max_length`."""


class Processor:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        layout: VocabLayout,
        template: ChatTemplate,
        media_tokenizers: dict[str, MediaTokenizer] | None = None,
        max_length: int | None = None,
    ):
        self.tokenizer, self.layout, self.template = tokenizer, layout, template
        self.media_tokenizers = dict(media_tokenizers or {})
        self.max_length = max_length
        if len(tokenizer) < layout.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the layout needs {layout.vocab_size}")
        for name, tok in self.media_tokenizers.items():
            if tok.spec != layout[name].spec:
                raise ValueError(f"{name}: media tokenizer gives {tok.spec} but the vocabulary has {layout[name].spec}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither a pad nor an eos token to pad with")
        self.pad_id = pad

    @classmethod
    def create(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        template: ChatTemplate | str = "plain",
        media_tokenizers: dict[str, MediaTokenizer] | None = None,
        specs: list[ModalitySpec] | None = None,
        max_length: int | None = None,
    ) -> "Processor":
        """Extend a text tokenizer with the tokens of every media tokenizer (and of `specs`,
        for modalities that only arrive pre-encoded)."""
        media_tokenizers = dict(media_tokenizers or {})
        for name, tok in media_tokenizers.items():
            if tok.modality != name:
                raise ValueError(f"media tokenizer '{tok.name}' is for {tok.modality}, not {name}")
        all_specs = [t.spec for t in media_tokenizers.values()] + list(specs or [])
        layout = VocabLayout.extend(tokenizer, all_specs)
        template = get_chat_template(template) if isinstance(template, str) else template
        return cls(tokenizer, layout, template, media_tokenizers, max_length)

    @property
    def end_of_turn_id(self) -> int | None:
        """Where a reply ends: the template's stop token where the tokenizer has it as one token, else eos."""
        stop = self.template.stop_token
        stop_id = None if stop is None else self.tokenizer.convert_tokens_to_ids(stop)
        if stop_id is not None and self.tokenizer.convert_ids_to_tokens(stop_id) == stop:  # not unk
            return stop_id
        return self.tokenizer.eos_token_id

    # ---- messages -> Sample -------------------------------------------------------------

    def encode(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = False,
        base_dir: str | os.PathLike | None = None,
        transcripts: bool = False,
    ) -> Sample:
        """One conversation -> Sample. `add_generation_prompt` appends the assistant prefix; `transcripts`
        fills `Sample.transcripts` from the media parts' "transcript" (one entry per continuous item)."""
        turns = validate_messages(messages)
        seq = _SequenceBuilder(self.tokenizer, transcripts)
        if self.template.bos and self.tokenizer.bos_token_id is not None:
            seq.ids([self.tokenizer.bos_token_id], labelled=False)
        systems: list[tuple[int, list[dict]]] = []  # waiting for the next user turn
        for i, (role, parts) in enumerate(turns):
            if role == "system" and self.template.system_prefix is None:
                systems.append((i, parts))
                continue
            prefix, suffix = self.template.frame(role)
            assistant = role == "assistant"
            seq.text(prefix, labelled=False)
            if role == "user":
                for system in systems:
                    self._content(seq, *system, labelled=False, base_dir=base_dir)
                    seq.text(self.template.system_suffix, labelled=False)
                systems.clear()
            self._content(seq, i, parts, labelled=assistant, base_dir=base_dir)
            seq.text(suffix, labelled=assistant)
            if assistant and self.template.assistant_eos and self.tokenizer.eos_token_id is not None:
                seq.ids([self.tokenizer.eos_token_id], labelled=True)
        if systems:
            raise MessageError(f"messages[{systems[0][0]}]: the {self.template.name} template puts a system message into "
                               "the next user turn, and no user message follows this one")
        if add_generation_prompt:
            seq.text(self.template.assistant_prefix, labelled=False)
        sample = seq.finish()
        if self.max_length is not None and len(sample) > self.max_length:
            raise SequenceTooLongError(f"conversation is {len(sample)} tokens long, over max_length {self.max_length}")
        return sample

    def __call__(
        self,
        conversations: list[list[dict]],
        *,
        add_generation_prompt: bool = False,
        padding_side: str = "right",
        base_dir: str | os.PathLike | None = None,
    ) -> MultimodalBatch:
        """Several conversations -> one padded batch (left padding for generation)."""
        samples = [self.encode(c, add_generation_prompt=add_generation_prompt, base_dir=base_dir) for c in conversations]
        return pad_collate(samples, self.pad_id, padding_side)

    def _content(self, seq: "_SequenceBuilder", turn: int, parts: list[dict], *, labelled: bool, base_dir) -> None:
        for j, part in enumerate(parts):
            if part["type"] == "text":
                seq.text(part["text"], labelled=labelled)
            else:
                where = f"messages[{turn}].content[{j}]"
                self._media_span(seq, part, where, labelled=labelled, base_dir=base_dir)

    def _media_span(self, seq: "_SequenceBuilder", part: dict, where: str, *, labelled: bool, base_dir) -> None:
        name = part["type"]
        if name not in self.layout.modalities:
            raise MessageError(f"{where}: this model has no {name} tokens (has: {sorted(self.layout.modalities)})")
        ids = self.layout[name]
        tokens = self._media_tokens(part, name, where, base_dir)
        seq.ids([ids.begin_id], labelled=labelled)
        if ids.spec.kind == "discrete":
            try:
                codes = self.layout.code_ids(name, tokens)
            except ValueError as e:  # a code outside the codebook
                raise MessageError(f"{where}: {e}") from e
            seq.ids(codes.tolist(), labelled=labelled)
        else:
            transcript = None if labelled else part.get("transcript")
            seq.features(name, ids.placeholder_id, tokens, is_target=labelled, transcript=transcript, where=where)
        seq.ids([ids.end_id], labelled=labelled)

    def _media_tokens(self, part: dict, name: str, where: str, base_dir) -> torch.Tensor:
        if "tokens" in part:
            return self._given_tokens(part["tokens"], name, where)
        if name not in self.media_tokenizers:
            raise MessageError(f"{where}: no {name} tokenizer is loaded, so {name} must come as 'tokens'")
        media = self.load_medium(part, name, where, base_dir)
        return self.media_tokenizers[name].encode(media)

    def _given_tokens(self, value: Any, name: str, where: str) -> torch.Tensor:
        """A part's pre-encoded tokens, checked: integer codes [N], or finite features [N, D]."""
        spec = self.layout[name].spec
        try:
            tokens = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as e:  # ragged, text, too large for int64, ...
            raise MessageError(f"{where}: {name} tokens must be a rectangular array of numbers ({e})") from e
        if tokens.numel() == 0:
            raise MessageError(f"{where}: empty {name} tokens")
        discrete = spec.kind == "discrete"
        if discrete and tokens.dim() != 1 or not discrete and (tokens.dim() != 2 or tokens.shape[1] != spec.feature_dim):
            shape = "[N]" if discrete else f"[N, {spec.feature_dim}]"
            raise MessageError(f"{where}: {spec.kind} {name} tokens must be {shape}, got shape {list(tokens.shape)}")
        if tokens.dtype == torch.bool or tokens.is_complex() or (discrete and tokens.is_floating_point()):
            numbers = "integer codes" if discrete else "real numbers"
            raise MessageError(f"{where}: {spec.kind} {name} tokens must be {numbers}, got {tokens.dtype}")
        if discrete:
            return tokens.long()  # their range is checked by code_ids
        tokens = tokens.float()
        if not torch.isfinite(tokens).all():
            raise MessageError(f"{where}: continuous {name} tokens contain NaN or inf (as float32)")
        return tokens

    def load_options(self, name: str) -> dict[str, Any]:
        """`load_media` keyword arguments for modality `name`: what its tokenizer reads (e.g. a video's sampled
        frames, not every frame) and nothing more."""
        return self.media_tokenizers[name].load_options if name in self.media_tokenizers else {}

    def load_medium(self, part: dict, name: str, where: str, base_dir) -> Image | Audio | Video:
        """A media part's medium, from its object, embedded bytes or path (relative to base_dir)."""
        key = next(k for k in ("media", name, "path", "bytes") if k in part)  # validated: exactly one
        value = part[key]
        if isinstance(value, MEDIA_TYPES[name]):
            return value
        options = self.load_options(name)
        if isinstance(value, (bytes, bytearray)):
            return load_media(bytes(value), name, **options)
        if key == "bytes":
            if not isinstance(value, str):
                raise MessageError(f"{where}: 'bytes' must be bytes or base64 text, got {type(value).__name__}")
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as e:
                raise MessageError(f"{where}: 'bytes' is not valid base64") from e
            return load_media(value, name, **options)
        if isinstance(value, (str, os.PathLike)):
            path = Path(value)
            if base_dir is not None and not path.is_absolute():
                path = Path(base_dir) / path
            return load_media(path, name, **options)
        raise MessageError(f"{where}: expected a path, bytes or {MEDIA_TYPES[name].__name__}, got {type(value).__name__}")

    # ---- ids -> text ----------------------------------------------------------------------

    def decode_text(self, ids: list[int] | torch.Tensor) -> str:
        """The text of `ids`, with media spans and special tokens dropped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- save / load ----------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        media = {}
        for name, tok in self.media_tokenizers.items():
            tok.save_pretrained(path / MEDIA_TOKENIZERS_DIR / name)
            media[name] = f"{MEDIA_TOKENIZERS_DIR}/{name}"
        config = {
            "vocab_layout": self.layout.to_dict(),
            "chat_template": asdict(self.template),
            "media_tokenizers": media,
            "max_length": self.max_length,
        }
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Processor":
        path = Path(path)
        file = path / CONFIG_FILE
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
            layout = VocabLayout.from_dict(config["vocab_layout"])
            template = chat_template_from_dict(config["chat_template"])
            subdirs = dict(config["media_tokenizers"])
        except OSError as e:
            raise FileNotFoundError(f"{path}: not an mllm checkpoint (no {CONFIG_FILE})") from e
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not a processor's fields
            raise ValueError(f"{file}: not a valid processor config ({type(e).__name__}: {e})") from e
        media = {name: load_media_tokenizer(path / sub) for name, sub in subdirs.items()}
        return cls(AutoTokenizer.from_pretrained(path), layout, template, media, config.get("max_length"))


class _SequenceBuilder:
    """Accumulates ids and labels; adjacent text with the same labelling is tokenized in one piece."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, transcripts: bool = False):
        self.tokenizer, self.keep_transcripts = tokenizer, transcripts
        self._ids: list[int] = []
        self._labelled: list[bool] = []
        self._text, self._text_labelled = "", False
        self._features: dict[str, list[torch.Tensor]] = {}
        self._targets: dict[str, list[bool]] = {}
        self._transcripts: dict[str, list[torch.Tensor]] = {}

    def text(self, text: str, *, labelled: bool) -> None:
        if not text:
            return
        if self._text and labelled != self._text_labelled:
            self._flush()
        self._text, self._text_labelled = self._text + text, labelled

    def ids(self, ids: list[int], *, labelled: bool) -> None:
        self._flush()
        self._ids += ids
        self._labelled += [labelled] * len(ids)

    def features(
        self, name: str, placeholder_id: int, feats: torch.Tensor, *, is_target: bool,
        transcript: str | None = None, where: str = "",
    ) -> None:
        # Placeholders never carry a CE label: their content is a feature, predicted by a head.
        self.ids([placeholder_id] * feats.shape[0], labelled=False)
        self._features.setdefault(name, []).append(feats)
        self._targets.setdefault(name, []).extend([is_target] * feats.shape[0])
        if self.keep_transcripts:
            ids = self.tokenizer(transcript, add_special_tokens=False)["input_ids"] if transcript else []
            # CTC emits one token per slot and needs a blank slot between two equal tokens
            needed = len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))
            if needed > feats.shape[0]:
                raise MessageError(f"{where}: its transcript needs {needed} slots (one per token, one between "
                                   f"repeats) but the {name} has {feats.shape[0]} tokens")
            self._transcripts.setdefault(name, []).append(torch.tensor(ids, dtype=torch.long))

    def _flush(self) -> None:
        if self._text:
            ids = self.tokenizer(self._text, add_special_tokens=False)["input_ids"]
            self._ids += ids
            self._labelled += [self._text_labelled] * len(ids)
            self._text = ""

    def finish(self) -> Sample:
        self._flush()
        ids = torch.tensor(self._ids, dtype=torch.long)
        labels = torch.where(torch.tensor(self._labelled, dtype=torch.bool), ids, IGNORE_INDEX)
        return Sample(
            input_ids=ids,
            labels=labels,
            features={m: torch.cat(f).float() for m, f in self._features.items()},
            feature_targets={m: torch.tensor(t, dtype=torch.bool) for m, t in self._targets.items()},
            transcripts=self._transcripts,
        )


def part_notes(part: dict) -> dict:
    """A media part's notes (e.g. its transcript), to carry over to a part that replaces its source."""
    return {k: part[k] for k in NOTE_KEYS if k in part}


def validate_messages(messages: Any) -> list[tuple[str, list[dict]]]:
    """Check the message structure; return (role, parts) with string content turned into a text part."""
    if not isinstance(messages, list) or not messages:
        raise MessageError(f"messages must be a non-empty list, got {type(messages).__name__}")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise MessageError(f"{where}: expected an object with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise MessageError(f"{where}: role must be one of {ROLES}, got {role!r}")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise MessageError(f"{where}: content must be a string or a list of parts")
        for j, part in enumerate(content):
            _validate_part(part, f"{where}.content[{j}]")
        turns.append((role, content))
    return turns


def _validate_part(part: Any, where: str) -> None:
    if not isinstance(part, dict):
        raise MessageError(f"{where}: a content part must be an object, got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise MessageError(f"{where}: a text part needs a string 'text'")
        return
    if kind not in MODALITIES:
        raise MessageError(f"{where}: unknown part type {kind!r} (expected 'text' or one of {MODALITIES})")
    if "transcript" in part and not (isinstance(part["transcript"], str) and part["transcript"].strip()):
        raise MessageError(f"{where}: 'transcript' must be non-empty text, got {part['transcript']!r}")
    sources = [k for k in (*SOURCE_KEYS, kind) if k in part]
    if len(sources) != 1:
        found = ", ".join(sources) or "none"
        raise MessageError(f"{where}: a {kind} part needs exactly one of {SOURCE_KEYS + (kind,)}, found: {found}")
