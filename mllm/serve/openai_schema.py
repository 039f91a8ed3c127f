"""OpenAI chat-completion requests -> our messages and GenerationConfig, or a 4xx with OpenAI-style error JSON.

Content parts understood (any role):

    {"type": "text", "text": "..."}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..." | "file:///..." | "/abs/path"}}
    {"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav" | "mp3" | "flac" | "ogg"}}
    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..." | "file:///..."}}
    {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,..."}}      (vLLM's form; replies use it too)

Remote URLs (http, https, ...) are never fetched; local paths only under `allowed_local_media_path`.
A request may ask for a medium in the reply with `"modalities": ["text", "image"]` (it opens with one), or let the
model write any of several (`["text", "image", "audio"]`); without `modalities` the reply is text only.

Audio transcription requests (`/v1/audio/transcriptions`, multipart form fields) -> TranscriptionRequest:
`file` (the recording), `model`, `response_format` (json | text), `language` (en), `temperature` (0).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mllm.generation import GenerationConfig, TokenSampling
from mllm.media import Audio, Image, MediaError, MediaLimits, Video, load_media
from mllm.processor import MEDIA_TYPES
from mllm.serve.limits import ServeLimits

URL_PARTS = {"image_url": "image", "audio_url": "audio", "video_url": "video"}
AUDIO_FORMATS = {"wav", "mp3", "flac", "ogg"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list[dict]  # our processor's message format, media already loaded
    config: GenerationConfig
    max_tokens: int | None  # as asked; None: whatever max_total_tokens leaves
    force: str | None  # a modality the reply opens with
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage, before [DONE]


@dataclass
class TranscriptionRequest:
    messages: list[dict]  # one user turn: the recording, then the instruction
    response_format: str  # "json" | "text"


TRANSCRIBE_INSTRUCTION = "Transcribe the audio."  # the eval's LibriSpeech prompt, one of the speech corpus' three
TRANSCRIPT_FORMATS = ("json", "text")


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body, parse_constant=_not_a_number)
    except (ValueError, RecursionError) as e:  # malformed, an integer of over 4300 digits, nesting too deep
        raise RequestError(400, f"invalid JSON body: {e}", code="invalid_json") from e
    if not isinstance(value, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(value).__name__}", code="invalid_json")
    return value


def _not_a_number(name: str) -> None:
    raise RequestError(400, f"invalid JSON body: {name} is not valid JSON (numbers must be finite)", code="invalid_json")


def parse_chat_request(body: dict[str, Any], model_name: str, reads: dict[str, dict], writes: set[str],
                       limits: ServeLimits) -> ChatRequest:
    """Validate everything but the token counts (those need the processor)."""
    model = body.get("model", model_name)
    if model != model_name:
        raise RequestError(404, f"the model {model!r} does not exist; this server has {model_name!r}", param="model",
                           code="model_not_found")
    _refuse_unsupported(body)
    stream = _typed(body, "stream", bool, False)
    n = _typed(body, "n", int, 1)
    if n != 1:
        raise RequestError(400, "only n=1 is supported", param="n")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "'messages' must be a non-empty list", param="messages")
    counts = {m: 0 for m in MEDIA_TYPES}
    # _part counts each medium and refuses the first past limit_mm_per_prompt
    messages = [_message(m, f"messages[{i}]", counts, reads, limits) for i, m in enumerate(raw)]
    force, media = _modalities(body, writes)
    return ChatRequest(messages, _config(body, media), _max_tokens(body), force, stream, _include_usage(body, stream))


def parse_transcription_request(form: dict[str, str | bytes], model_name: str, reads: dict[str, dict],
                                limits: ServeLimits) -> TranscriptionRequest:
    """Validate an OpenAI transcription form (`file` holds the uploaded bytes; every other field is text)."""
    model = form.get("model", model_name)
    if model != model_name:
        raise RequestError(404, f"the model {model!r} does not exist; this server has {model_name!r}", param="model",
                           code="model_not_found")
    if "audio" not in reads:
        raise RequestError(400, "this model does not read audio, so it cannot transcribe", param="file")
    unknown = sorted(set(form) - {"file", "model", "response_format", "language", "temperature"})
    if unknown:
        raise RequestError(400, f"unsupported field(s) {unknown}: this server reads file, model, response_format, "
                                "language and temperature", param=unknown[0])
    data = form.get("file")
    if not isinstance(data, bytes):
        raise RequestError(400, "'file' is required: the recording, sent as a multipart file field", param="file")
    response_format = form.get("response_format", "json")
    if response_format not in TRANSCRIPT_FORMATS:
        raise RequestError(400, f"'response_format' must be one of {list(TRANSCRIPT_FORMATS)}, got {response_format!r}",
                           param="response_format")
    if form.get("language", "en") != "en":
        raise RequestError(400, f"this model transcribes English only ('language': en), got {form['language']!r}",
                           param="language")
    try:
        temperature = float(form.get("temperature", 0))
    except (TypeError, ValueError) as e:
        raise RequestError(400, f"'temperature' must be a number, got {form['temperature']!r}", param="temperature") from e
    if temperature != 0:
        raise RequestError(400, "'temperature': transcripts are decoded deterministically (the greedy reply, rescored "
                                "by the recording's CTC reading where the model learned one); only 0 is supported",
                           param="temperature")
    audio = _load(data, "audio", "file", limits, reads["audio"])
    content = [{"type": "audio", "media": audio}, {"type": "text", "text": TRANSCRIBE_INSTRUCTION}]
    return TranscriptionRequest([{"role": "user", "content": content}], response_format)


def _typed(body: dict, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RequestError(400, f"'{key}' must be {names}, got {json.dumps(value)[:80]}", param=key)
    return value


# OpenAI fields this server cannot honour, with the values that ask for nothing (clients often send those)
UNSUPPORTED = {"logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "functions": ([],),
               "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},),
               "response_format": ({"type": "text"},)}


def _refuse_unsupported(body: dict) -> None:
    """A 400 naming a field whose request the reply would silently not meet (logprobs, tools, JSON mode ...)."""
    for key, harmless in UNSUPPORTED.items():
        if body.get(key) is not None and body[key] not in harmless:
            hint = " (repetition_penalty is)" if key.endswith("_penalty") else ""
            raise RequestError(400, f"'{key}' is not supported by this server{hint}, got {json.dumps(body[key])[:80]}",
                               param=key, code="unsupported_parameter")


def _include_usage(body: dict, stream: bool) -> bool:
    options = _typed(body, "stream_options", dict, None)
    if options is None:
        return False
    if not stream:
        raise RequestError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    return _typed(options, "include_usage", bool, False)


def _max_tokens(body: dict) -> int | None:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _typed(body, key, int, None)
    if value is not None and value <= 0:
        raise RequestError(400, f"'{key}' must be positive, got {value}", param=key)
    return value


def _config(body: dict, media: list[str]) -> GenerationConfig:
    """The sampling settings; the reply writes only the `media` that `modalities` asks for, text alone by default
    (OpenAI's `modalities` defaults to ["text"], and its clients expect a string `content`)."""
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of strings", param="stop")
    if "" in stop:
        raise RequestError(400, "'stop' holds an empty string, which every reply contains before its first token",
                           param="stop")
    try:
        sampling = TokenSampling(
            temperature=_finite(body, "temperature", 0.0),
            top_k=_typed(body, "top_k", int, 0),
            top_p=_finite(body, "top_p", 1.0),
            repetition_penalty=_finite(body, "repetition_penalty", 1.0),
        )
    except ValueError as e:
        raise RequestError(400, f"bad sampling options: {e}") from e
    seed = _typed(body, "seed", int, None)
    if seed is not None and not 0 <= seed < 2**63:
        raise RequestError(400, f"'seed' must be from 0 to 2**63 - 1, got {seed}", param="seed")
    return GenerationConfig(stop_strings=stop, text=sampling, codes=sampling, seed=seed, writes=media)


def _finite(body: dict, key: str, default: float) -> float:
    value = _typed(body, key, (int, float), default)
    try:
        value = float(value)
    except OverflowError:  # an integer past float's range
        value = math.inf
    if not math.isfinite(value):  # 1e400 parses as inf
        raise RequestError(400, f"'{key}' must be a finite number, got {json.dumps(body[key])[:80]}", param=key)
    return value


def _modalities(body: dict, modalities: set[str]) -> tuple[str | None, list[str]]:
    """(the medium the reply opens with, the media it may write) from `modalities`: none and text only by default,
    as OpenAI's; one medium is written first; two or more may each be written where the model chooses."""
    asked = _typed(body, "modalities", list, ["text"])
    if not all(isinstance(m, str) for m in asked):
        raise RequestError(400, "'modalities' must be a list of strings", param="modalities")
    media = list(dict.fromkeys(m for m in asked if m != "text"))
    for m in media:
        if m not in modalities:
            raise RequestError(400, f"'modalities': this model cannot write {m!r} (it writes text and {sorted(modalities)})",
                               param="modalities")
    return (media[0] if len(media) == 1 else None), media


def _message(message: Any, where: str, counts: dict[str, int], modalities: dict[str, dict], limits: ServeLimits) -> dict:
    if not isinstance(message, dict):
        raise RequestError(400, f"{where}: expected an object with 'role' and 'content'", param=where)
    role = message.get("role")
    if role not in ROLES:
        raise RequestError(400, f"{where}: role must be one of {sorted(ROLES)}, got {role!r}", param=f"{where}.role")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return {"role": ROLES[role], "content": content or ""}
    if not isinstance(content, list):
        raise RequestError(400, f"{where}: content must be a string or a list of parts", param=f"{where}.content")
    parts = [_part(p, f"{where}.content[{j}]", counts, modalities, limits) for j, p in enumerate(content)]
    return {"role": ROLES[role], "content": parts}


def _part(part: Any, where: str, counts: dict[str, int], modalities: dict[str, dict], limits: ServeLimits) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(400, f"{where}: a text part needs a string 'text'", param=where)
        return {"type": "text", "text": part["text"]}
    if kind in URL_PARTS:
        modality = URL_PARTS[kind]
        inner = part.get(kind)
        url = inner.get("url") if isinstance(inner, dict) else inner
        if not isinstance(url, str) or not url:
            raise RequestError(400, f"{where}: a {kind} part needs {{'{kind}': {{'url': ...}}}}", param=where)
        data = _url_bytes(url, modality, where, limits)
    elif kind == "input_audio":
        modality = "audio"
        inner = part.get("input_audio")
        if not isinstance(inner, dict) or not isinstance(inner.get("data"), str):
            raise RequestError(400, f"{where}: an input_audio part needs {{'input_audio': {{'data': base64, 'format': ...}}}}",
                               param=where)
        if inner.get("format", "wav") not in AUDIO_FORMATS:
            raise RequestError(400, f"{where}: audio format {inner.get('format')!r} is not one of {sorted(AUDIO_FORMATS)}",
                               param=where, code="unsupported_media_type")
        data = _b64(inner["data"], where)
    else:
        raise RequestError(400, f"{where}: unknown content part type {kind!r} (expected text, image_url, input_audio or "
                                "video_url)", param=where)
    if modality not in modalities:
        raise RequestError(400, f"{where}: this model does not read {modality} (it reads {sorted(modalities) or 'text only'})",
                           param=where, code="unsupported_modality")
    counts[modality] += 1
    if counts[modality] > limits.items_allowed(modality):
        raise RequestError(400, f"too many {modality} items: the limit is {limits.items_allowed(modality)} per request "
                                "(limit_mm_per_prompt)", param=where, code="too_many_media")
    return {"type": modality, "media": _load(data, modality, where, limits, modalities[modality])}


def _load(data: bytes, modality: str, where: str, limits: ServeLimits, options: dict) -> Image | Audio | Video:
    """The decoded medium, refused (413, naming the limit) before it decodes to more than the server allows;
    `options`: the model's tokenizer's load options (a video's sampled frames only)."""
    pixels = limits.max_video_frame_pixels if modality == "video" else limits.max_image_pixels
    media_limits = MediaLimits(max_bytes=limits.max_request_bytes, max_pixels=pixels, max_frames=limits.max_video_frames)
    try:
        return load_media(data, modality, limits=media_limits, **options)
    except MediaError as e:
        if limit := _limit_hit(e.reason, modality):
            raise RequestError(413, f"{where}: cannot read the {modality}: {e.reason} ({limit})", param=where,
                               code="media_too_large") from e
        raise RequestError(400, f"{where}: cannot read the {modality}: {e.reason}", param=where, code="invalid_media") from e


def _limit_hit(reason: str, modality: str) -> str | None:
    """The ServeLimits field a loader's refusal is about (its reasons start so), or None: a bad medium, not a big one."""
    if reason.startswith("too large"):
        return "max_request_bytes"
    if reason.startswith("too many samples"):  # the loaders' own bounds, no server flag: what they are named in media
        return "MediaLimits.max_samples"
    if reason.startswith("too long"):
        return "MediaLimits.max_duration_s"
    if reason.startswith("too many frames"):
        return "max_video_frames"
    if reason.startswith("too many pixels"):
        return "max_video_frame_pixels" if modality == "video" else "max_image_pixels"
    return None


def _b64(text: str, where: str) -> bytes:
    """The decoded data (no size check: it is shorter than the body, which read_body bounds)."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{where}: the data is not valid base64", param=where, code="invalid_base64") from e


def _url_bytes(url: str, modality: str, where: str, limits: ServeLimits) -> bytes:
    if url.startswith("data:"):
        header, comma, payload = url[5:].partition(",")
        if not comma or not header.endswith(";base64"):
            raise RequestError(400, f"{where}: a data URL must look like data:<mime>;base64,<data>", param=where)
        mime = header.removesuffix(";base64").split(";")[0].strip().lower()
        if not mime.startswith(f"{modality}/") and not (modality == "video" and mime == "image/gif"):
            raise RequestError(400, f"{where}: MIME type {mime!r} is not {modality}/*", param=where,
                               code="unsupported_media_type")
        return _b64(payload, where)
    parsed = urlparse(url)
    if parsed.scheme not in ("", "file"):
        raise RequestError(400, f"{where}: {parsed.scheme} URLs are not fetched; send a data URL", param=where,
                           code="remote_media_disabled")
    return _local_file(Path(unquote(parsed.path)), where, limits)


def _local_file(path: Path, where: str, limits: ServeLimits) -> bytes:
    root = limits.allowed_local_media_path
    if root is None:
        raise RequestError(403, f"{where}: local paths are refused (no allowed_local_media_path)", param=where,
                           code="local_media_disabled")
    resolved = path.resolve()
    if not path.is_absolute() or not resolved.is_relative_to(Path(root).resolve()):
        raise RequestError(403, f"{where}: {path} is not under the allowed local media path", param=where,
                           code="local_media_disabled")
    if not resolved.is_file():
        raise RequestError(400, f"{where}: no such file {path}", param=where, code="invalid_media")
    if resolved.stat().st_size > limits.max_request_bytes:
        raise RequestError(413, f"{where}: {path} is over max_request_bytes ({limits.max_request_bytes})", param=where)
    return resolved.read_bytes()
