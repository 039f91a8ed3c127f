"""The FastAPI app: OpenAI-compatible chat completions and audio transcriptions over one Pipeline, with limits.

Generation runs in worker threads, one at a time (the pipeline's lock); at most
`max_concurrent_requests` requests are admitted (running or waiting) and the
rest get 429 at once. `request_timeout_s` runs from admission: a body not all
arrived by then gets 408; a request still loading its media (which cannot be
stopped: it keeps its slot until they are loaded) or generating gets 504 (or an
SSE error event), and its generation stops at the next token, as it does when
the client goes away.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from mllm.errors import InputError
from mllm.media import Audio, Image, MediaError, Video, save_audio, save_image, save_video
from mllm.pipeline import Item, Media, Pipeline
from mllm.processor import MessageError, SequenceTooLongError
from mllm.serve.limits import ServeLimits
from mllm.serve.openai_schema import (ChatRequest, RequestError, TranscriptionRequest, parse_chat_request, parse_json,
                                      parse_transcription_request)
from mllm.serve.stop_strings import StopFilter, cut

Event = tuple[str, Any]  # ("text", str) | ("media", part) | ("done", (parts, finish reason, tokens)) | ("error", Exception)
TRANSCRIPT_TOKENS = 96  # at most this many new tokens per transcript
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
_FORMATS = {Image: ("image", "png", "image/png", save_image), Audio: ("audio", "wav", "audio/wav", save_audio),
            Video: ("video", "mp4", "video/mp4", save_video)}


class _Cancelled(Exception):
    """Raised inside generation callbacks to stop a request that timed out or was abandoned."""


class _Slot:
    """One admitted request; released exactly once, by whoever finishes last with it."""

    def __init__(self, server: "_Server"):
        self._server, self._released = server, False

    def release(self) -> None:
        with self._server.count_lock:
            if not self._released:
                self._released = True
                self._server.active -= 1


def media_part(media: Media) -> dict[str, Any]:
    """A generated medium as an OpenAI-style content part with a data URL (png, wav or mp4)."""
    modality, suffix, mime, save = _FORMATS[type(media)]
    with tempfile.TemporaryDirectory() as tmp:
        data = save(media, Path(tmp) / f"out.{suffix}").read_bytes()
    kind = f"{modality}_url"
    return {"type": kind, kind: {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def reply_content(parts: list[dict]) -> str | list[dict]:
    """A plain string when the reply is only text (what OpenAI clients expect), else the part list."""
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


class _Server:
    def __init__(self, pipeline: Pipeline, limits: ServeLimits, model_name: str):
        self.pipeline, self.limits, self.model_name = pipeline, limits, model_name
        self.reads = {m: pipeline.processor.load_options(m) for m in pipeline.processor.media_tokenizers}
        self.writes = set(pipeline.detokenizers) & set(pipeline.processor.layout.modalities)
        self.generate_lock, self.count_lock = threading.Lock(), threading.Lock()
        self.active = 0
        self.executor = ThreadPoolExecutor(max_workers=limits.max_concurrent_requests, thread_name_prefix="mllm-serve")
        self.created = int(time.time())

    def admit(self) -> _Slot:
        with self.count_lock:
            if self.active >= self.limits.max_concurrent_requests:
                raise RequestError(429, f"the server is busy: {self.active} requests in flight, the limit is "
                                        f"{self.limits.max_concurrent_requests} (max_concurrent_requests); retry later",
                                   code="rate_limit_exceeded")
            self.active += 1
        return _Slot(self)

    async def read_body(self, request: Request, deadline: float) -> bytes:
        """The whole body, by the deadline (else 408: the client is too slow) and within max_request_bytes."""
        try:
            return await asyncio.wait_for(self._read_body(request), _left(deadline))
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise RequestError(408, f"the request body did not arrive within request_timeout_s "
                                    f"({self.limits.request_timeout_s} s)", code="timeout") from None

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"the request is {declared} bytes, over max_request_bytes ({limit})")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"the request is over max_request_bytes ({limit})")
        return bytes(body)

    async def prepared(self, slot: _Slot, deadline: float, prepare: Callable, *args) -> Any:
        """prepare(*args) in a worker thread, by the deadline. On any failure the slot is released, but not before
        the worker finishes: past the deadline it answers 504 while its media go on loading (they cannot be stopped)."""
        try:
            work = asyncio.get_running_loop().run_in_executor(self.executor, prepare, *args)
        except RuntimeError:  # the executor is shutting down
            slot.release()
            raise
        try:
            return await asyncio.wait_for(asyncio.shield(work), _left(deadline))
        except BaseException:
            if work.done():
                slot.release()
            else:
                work.add_done_callback(lambda _: slot.release())
            raise

    def prepare(self, body: bytes) -> tuple[ChatRequest, int, int]:
        """Parse, load media and count tokens (in a worker thread): (request, prompt tokens, max new tokens)."""
        req = parse_chat_request(parse_json(body), self.model_name, self.reads, self.writes, self.limits)
        req.messages = self.encoded(req.messages)
        prompt = self.prompt_tokens(req.messages, req.force is not None)
        total, name = self.context()
        new = req.max_tokens if req.max_tokens is not None else total - prompt
        if prompt + new > total:
            raise RequestError(400, f"prompt ({prompt}) + max_tokens ({new}) is over {name} ({total})",
                               param="max_tokens", code="context_length_exceeded")
        return req, prompt, new

    def context(self) -> tuple[int, str]:
        """The positions a request may fill, prompt and reply: max_total_tokens, or the model's own positions
        where they are fewer (past them a RoPE model writes on, but garbage); and the name of that bound."""
        positions = getattr(self.pipeline.model.language_model.config, "max_position_embeddings", None)
        if positions and positions < self.limits.max_total_tokens:
            return positions, "the model's max_position_embeddings"
        return self.limits.max_total_tokens, "max_total_tokens"

    def prepare_transcription(self, form: dict[str, str | bytes]) -> tuple[TranscriptionRequest, int]:
        """Parse, load the recording and count tokens (in a worker thread): (request, max new tokens)."""
        req = parse_transcription_request(form, self.model_name, self.reads, self.limits)
        req.messages = self.encoded(req.messages)
        total, name = self.context()
        room = total - self.prompt_tokens(req.messages, False)
        if room <= 0:
            raise RequestError(400, f"the recording leaves no room for a transcript under {name} ({total})",
                               param="file", code="context_length_exceeded")
        return req, min(room, TRANSCRIPT_TOKENS)

    def encoded(self, messages: list[dict]) -> list[dict]:
        """The messages with each medium replaced by its tokens: encoded once, here, for the count and the reply
        (the processor would encode it for each), and the decoded medium let go while the request waits its turn."""
        tokenizers = self.pipeline.processor.media_tokenizers

        def part(p: dict) -> dict:
            if "media" not in p:
                return p
            try:
                return {"type": p["type"], "tokens": tokenizers[p["type"]].encode(p["media"])}
            except MediaError as e:  # the tokenizer's own checks of what it reads
                raise RequestError(400, str(e), param="messages") from e

        return [m | {"content": [part(p) for p in m["content"]]} if isinstance(m["content"], list) else m
                for m in messages]

    def prompt_tokens(self, messages: list[dict], forced: bool) -> int:
        try:
            prompt = len(self.pipeline.processor.encode(messages, add_generation_prompt=True)) + forced
        except (MessageError, SequenceTooLongError, MediaError) as e:
            raise RequestError(400, str(e), param="messages") from e
        if prompt > self.limits.max_input_tokens:
            raise RequestError(400, f"the prompt is {prompt} tokens, over max_input_tokens ({self.limits.max_input_tokens})",
                               param="messages", code="context_length_exceeded")
        return prompt

    def transcribe(self, req: TranscriptionRequest, max_new: int, cancel: threading.Event, slot: _Slot) -> str:
        """Worker thread: the recording's transcript (Pipeline.transcribe), unless the request gave up waiting."""
        try:
            with self.generate_lock:
                if cancel.is_set():
                    raise _Cancelled
                return self.pipeline.transcribe([req.messages], max_new_tokens=max_new)[0]
        finally:
            slot.release()

    def generate(self, req: ChatRequest, max_new: int, emit: Callable[[Event], None], cancel: threading.Event,
                 slot: _Slot) -> None:
        """Worker thread: run the pipeline, emitting text deltas and encoded media, then ("done", (parts, finish
        reason, generated tokens)): "length" when max_tokens ran out, "stop" otherwise, as OpenAI's API says.
        The text, streamed or not, ends before the stop string that ended it (`StopFilter`)."""
        encoded: dict[int, dict] = {}
        finish = []
        stops = StopFilter(req.config.stop_strings)

        def send_text(text: str) -> None:
            if text:
                emit(("text", text))

        def on_text(row: int, delta: str) -> None:
            if cancel.is_set():
                raise _Cancelled
            send_text(stops.text(delta))

        def on_media(row: int, media: Media) -> None:
            if cancel.is_set():
                raise _Cancelled
            send_text(stops.flush())
            encoded[id(media)] = media_part(media)
            emit(("media", encoded[id(media)]))

        try:
            with self.generate_lock:
                if cancel.is_set():
                    raise _Cancelled
                config = replace(req.config, max_new_tokens=max_new)
                [reply] = self.pipeline.chat([req.messages], config, force=req.force, on_text=on_text, on_media=on_media,
                                             on_finish=lambda row, reason, tokens: finish.append((reason, tokens)))
            [(reason, tokens)] = finish
            send_text(stops.flush())
            parts = [self._part(item, encoded, req.config.stop_strings) for item in reply]
            emit(("done", ([p for p in parts if p.get("text") != ""], "length" if reason == "length" else "stop", tokens)))
        except Exception as e:  # reported to the client as an error; the server stays up
            emit(("error", e))
        finally:
            slot.release()

    @staticmethod
    def _part(item: Item, encoded: dict[int, dict], stops: Sequence[str]) -> dict:
        if isinstance(item, str):
            return {"type": "text", "text": cut(item, stops)}
        return encoded.get(id(item)) or media_part(item)


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _failure(e: Exception, timeout: float) -> RequestError:
    if isinstance(e, RequestError):
        return e
    if isinstance(e, (_Cancelled, asyncio.TimeoutError)):
        return RequestError(504, f"the request took longer than request_timeout_s ({timeout} s)", code="timeout")
    if isinstance(e, (MessageError, MediaError)):
        return RequestError(400, str(e))
    return RequestError(500, f"generation failed: {type(e).__name__}: {e}")


def create_app(pipeline: Pipeline, limits: ServeLimits | None = None, model_name: str = "mllm",
               examples: Sequence[dict] = ()) -> FastAPI:
    """The API and the web page; `examples` ({"request", "attach", "reply"}) are requests the page offers to try."""
    server = _Server(pipeline, limits or ServeLimits(), model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="mllm", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server
    page = (files("mllm.serve") / "web" / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/examples")
    async def example_requests() -> dict[str, Any]:
        return {"examples": list(examples)}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "active_requests": server.active}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": server.created, "owned_by": "mllm",
                "input_modalities": ["text", *sorted(server.reads)], "output_modalities": ["text", *sorted(server.writes)]}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        slot = server.admit()  # a RequestError (429) goes to the handler below
        timeout = server.limits.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout  # covers the body, the media and the generation
        try:
            body = await server.read_body(request, deadline)
        except Exception as e:
            slot.release()
            return _error(_failure(e, timeout))
        try:
            req, prompt, max_new = await server.prepared(slot, deadline, server.prepare, body)
        except Exception as e:
            return _error(_failure(e, timeout))
        events, cancel = _start(server, req, max_new, slot)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.stream:
            usage_of = prompt if req.include_usage else None
            return StreamingResponse(_sse(events, cancel, meta, deadline, timeout, usage_of), media_type="text/event-stream")
        try:
            kind, value = await _reply(events, deadline, request)
        except asyncio.TimeoutError:
            cancel.set()
            return _error(_failure(_Cancelled(), timeout))
        except _Disconnected:
            cancel.set()  # nobody waits for the reply: stop at the next token
            return _error(RequestError(499, "the client disconnected before the reply was ready", code="client_closed"))
        if kind == "error":
            return _error(_failure(value, timeout))
        parts, finish, tokens = value
        choice = {"index": 0, "message": {"role": "assistant", "content": reply_content(parts)}, "finish_reason": finish}
        return JSONResponse({**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(prompt, tokens)})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        slot = server.admit()  # a RequestError (429) goes to the handler below
        loop, cancel = asyncio.get_running_loop(), threading.Event()
        timeout = server.limits.request_timeout_s
        deadline = loop.time() + timeout  # covers the body, the recording and the transcription
        try:
            form = await _read_form(request.headers, await server.read_body(request, deadline))
        except Exception as e:
            slot.release()
            return _error(_failure(e, timeout))
        try:
            req, max_new = await server.prepared(slot, deadline, server.prepare_transcription, form)
        except Exception as e:
            return _error(_failure(e, timeout))
        try:
            work = loop.run_in_executor(server.executor, server.transcribe, req, max_new, cancel, slot)
        except RuntimeError:  # the executor is shutting down
            slot.release()
            raise
        try:  # the worker releases the slot once it is done
            text = await asyncio.wait_for(asyncio.shield(work), _left(deadline))
        except asyncio.TimeoutError:
            cancel.set()
            return _error(_failure(_Cancelled(), timeout))
        except Exception as e:
            return _error(_failure(e, timeout))
        return PlainTextResponse(text) if req.response_format == "text" else JSONResponse({"text": text})

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(RequestError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    return app


async def _read_form(headers: Headers, body: bytes) -> dict[str, str | bytes]:
    """A multipart/form-data body as {field: text, or the bytes of an uploaded file}."""
    if not headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError(400, "send the recording as multipart/form-data (fields: file, model, ...)",
                           code="invalid_content_type")

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=1, max_fields=16).parse()
    except MultiPartException as e:
        raise RequestError(400, f"malformed multipart body: {e.message}", code="invalid_multipart") from e
    fields: dict[str, str | bytes] = {}
    for name, value in form.multi_items():
        fields[name] = await value.read() if isinstance(value, UploadFile) else value
    await form.close()
    return fields


def _start(server: _Server, req: ChatRequest, max_new: int, slot: _Slot) -> tuple[asyncio.Queue, threading.Event]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    cancel = threading.Event()

    def emit(event: Event) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    try:
        server.executor.submit(server.generate, req, max_new, emit, cancel, slot)
    except RuntimeError:  # the executor is shutting down
        slot.release()
        raise
    return events, cancel


class _Disconnected(Exception):
    """The client of a non-streaming request went away."""


def _left(deadline: float) -> float:
    return max(deadline - asyncio.get_running_loop().time(), 0.001)


async def _next(events: asyncio.Queue, deadline: float) -> Event:
    return await asyncio.wait_for(events.get(), _left(deadline))


async def _reply(events: asyncio.Queue, deadline: float, request: Request) -> Event:
    """A non-streaming request's last event ("done" or "error"); asyncio.TimeoutError past the deadline, and
    _Disconnected once its client has gone (checked every DISCONNECT_POLL_S, as events arrive or not: a
    non-streaming response learns of it no other way)."""
    loop = asyncio.get_running_loop()
    while True:
        check = min(loop.time() + DISCONNECT_POLL_S, deadline)
        try:
            while True:
                kind, value = await asyncio.wait_for(events.get(), max(check - loop.time(), 0.001))
                if kind in ("done", "error"):
                    return kind, value
        except asyncio.TimeoutError:
            if loop.time() >= deadline:
                raise
        if await request.is_disconnected():
            raise _Disconnected


async def _sse(events: asyncio.Queue, cancel: threading.Event, meta: dict, deadline: float, timeout: float,
               usage_of: int | None) -> AsyncIterator[str]:
    """OpenAI chat.completion.chunk events: the role, text deltas, media parts as they decode, the finish, [DONE].
    With `usage_of`, the prompt's token count (stream_options.include_usage), as OpenAI's: each chunk has
    "usage": null, and one more chunk with no choices and the usage comes after the finish."""

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {**meta, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage_of is not None:
            body["usage"] = None
        return _data(body)

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                kind, value = await _next(events, deadline)
            except asyncio.TimeoutError:
                yield _data(_failure(_Cancelled(), timeout).body())
                break
            if kind == "text":
                yield chunk({"content": value})
            elif kind == "media":
                yield chunk({"content": [value]})
            elif kind == "error":
                yield _data(_failure(value, timeout).body())
                break
            else:
                yield chunk({}, finish=value[1])
                if usage_of is not None:
                    yield _data({**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(usage_of, value[2])})
                break
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # a finished generation ignores it; an abandoned or timed-out one stops at its next token


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _data(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


class ListenError(InputError):
    """The server cannot listen on the address it was given."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port; a ListenError naming the address and why not (in use, not this machine's)."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        # a resolver's gaierror has its own errno numbers; create_server adds the address to strerror
        why = e.strerror if isinstance(e, socket.gaierror) else os.strerror(e.errno) if e.errno else e
        raise ListenError(f"cannot listen on {host}:{port}: {why}") from None


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None,
          model_name: str | None = None, device: str | None = None, examples: Sequence[dict] = ()) -> None:
    """Load a checkpoint and serve it until interrupted. The address is taken first: a port in use fails at
    once, before the model loads."""
    import uvicorn

    sock = listening_socket(host, port)
    pipeline = Pipeline.from_pretrained(model, device=device)
    app = create_app(pipeline, limits, model_name or Path(model).resolve().name, examples)
    print(f"mllm serve: http://{host}:{port}/ (API: /v1/chat/completions, /v1/audio/transcriptions)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
