"""`mllm serve`: the OpenAI-compatible API, its limits, streaming, and a matrix of malformed requests.

The model is a tiny random Llama that reads and writes images (raw patches), audio (toy discrete
codes) and video (toy continuous frames); asked for a medium with `modalities`, it writes one.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient
from PIL import Image as PILImage

from mllm.checkpoint import HeadConfig, MediaConfig, ModelConfig, build_model
from mllm.detokenizers import DeTokenizer, build_detokenizer
from mllm.media import Audio, Image, Video, load_media, save_video
from mllm.pipeline import Pipeline
from mllm.serve.app import create_app
from mllm.serve.openai_schema import RequestError
from mllm.serve.limits import ServeLimits, parse_mm_limits
from mllm.serve.stop_strings import StopFilter, cut
from mllm.tokenizers.base import MediaTokenizer
from tests.conftest import TINY_LMS

PATCH = {"image_size": 8, "patch_size": 4}  # 4 tokens of 48 per image
MODEL = "tiny"


@dataclass
class NoConfig:
    pass


class ToyAudioTokenizer(MediaTokenizer):
    """4 discrete codes: the loudness of each quarter of the clip."""

    name, modality, kind, config_class = "toy_audio", "audio", "discrete", NoConfig

    @property
    def codebook_size(self) -> int:
        return 16

    def num_tokens(self, media: Audio) -> int:
        return 4

    def encode(self, media: Audio) -> torch.Tensor:
        quarters = np.array_split(np.abs(media.to_mono().samples[0]), 4)
        return torch.tensor([min(15, int(q.mean() * 16)) if q.size else 0 for q in quarters])


class ToyAudioDeTokenizer(DeTokenizer):
    name, modality, kind, config_class = "toy_audio", "audio", "discrete", NoConfig

    def decode(self, tokens, *, guidance=1.0, steps=None, generator=None) -> Audio:
        t = np.arange(800) / 8000
        wave = np.concatenate([float(c) / 16 * np.sin(2 * np.pi * 440 * t) for c in tokens.tolist()])
        return Audio(wave[None].astype(np.float32), 8000)


class ToyVideoTokenizer(MediaTokenizer):
    """2 continuous tokens: the first and last frame at 2x2 pixels."""

    name, modality, kind, config_class = "toy_video", "video", "continuous", NoConfig

    @property
    def feature_dim(self) -> int:
        return 12

    def num_tokens(self, media: Video) -> int:
        return 2

    def encode(self, media: Video) -> torch.Tensor:
        frames = [Image(media.frames[i]).resize(2).to_tensor().flatten() for i in (0, -1)]
        return torch.stack(frames) * 2 - 1


class ToyVideoDeTokenizer(DeTokenizer):
    name, modality, kind, config_class = "toy_video", "video", "continuous", NoConfig

    def decode(self, tokens, *, guidance=1.0, steps=None, generator=None) -> Video:
        small = ((tokens.clamp(-1, 1) + 1) / 2).reshape(-1, 3, 2, 2)
        return Video.from_tensor(small.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3), fps=2)


def tiny_image_pipeline(tokenizer_dir: Path) -> Pipeline:
    """Images in and out: the pipeline a checkpoint directory can hold (for subprocess tests)."""
    model, processor = build_model(ModelConfig(
        base_config=dict(TINY_LMS["llama"]), tokenizer=str(tokenizer_dir),
        media={"image": MediaConfig(tokenizer="patch", options=PATCH, tokens_per_item=4)},
        heads={"image": HeadConfig(name="gmm", options={"num_components": 2})},
    ))
    return Pipeline(model, processor, {"image": build_detokenizer("patch", PATCH)})


@pytest.fixture(scope="session")
def image_checkpoint(mistral_tokenizer_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "ckpt"
    tiny_image_pipeline(mistral_tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pipeline(mistral_tokenizer_dir) -> Pipeline:
    model, processor = build_model(ModelConfig(
        base_config=dict(TINY_LMS["llama"]), tokenizer=str(mistral_tokenizer_dir),
        media={"image": MediaConfig(tokenizer="patch", options=PATCH, tokens_per_item=4),
               "audio": MediaConfig(kind="discrete", codebook_size=16, tokens_per_item=4),
               "video": MediaConfig(kind="continuous", feature_dim=12, tokens_per_item=2)},
        heads={"image": HeadConfig(name="gmm", options={"num_components": 2}),
               "video": HeadConfig(name="gmm", options={"num_components": 2})},
    ))
    processor.media_tokenizers.update(audio=ToyAudioTokenizer(NoConfig()), video=ToyVideoTokenizer(NoConfig()))
    detokenizers = {"image": build_detokenizer("patch", PATCH), "audio": ToyAudioDeTokenizer(NoConfig()),
                    "video": ToyVideoDeTokenizer(NoConfig())}
    return Pipeline(model, processor, detokenizers)


LIMITS = ServeLimits(limit_mm_per_prompt={"image": 2, "audio": 1, "video": 1}, max_request_bytes=200_000,
                     max_input_tokens=200, max_total_tokens=300, request_timeout_s=60, max_concurrent_requests=2)


@pytest.fixture(scope="module")
def client(pipeline, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    with TestClient(create_app(pipeline, replace(LIMITS, allowed_local_media_path=allowed), MODEL)) as c:
        c.allowed = allowed
        yield c


# ---- media fixtures ------------------------------------------------------------------------


def png_bytes(size: int = 8) -> bytes:
    out = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def wav_bytes() -> bytes:
    out = io.BytesIO()
    sf.write(out, (0.5 * np.sin(np.arange(1600) / 5)).astype(np.float32), 8000, format="WAV")
    return out.getvalue()


@pytest.fixture(scope="module")
def mp4_bytes(tmp_path_factory) -> bytes:
    frames = np.random.default_rng(1).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    return save_video(Video(frames, fps=4), tmp_path_factory.mktemp("video") / "clip.mp4").read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_part(data: bytes | None = None, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64(data or png_bytes())}"}}


def audio_part() -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(wav_bytes()), "format": "wav"}}


def request(content, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


def decode_part(part: dict):
    kind = part["type"].removesuffix("_url")
    header, data = part[part["type"]]["url"].split(",", 1)
    assert header.startswith(f"data:{kind}/")
    return load_media(base64.b64decode(data), kind)


def assert_alive(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    ok = client.post("/v1/chat/completions", json=request("Still there?", max_tokens=2))
    assert ok.status_code == 200, ok.text


# ---- the happy paths -----------------------------------------------------------------------


def test_health_models_and_page(client):
    assert client.get("/health").json() == {"status": "ok", "model": MODEL, "active_requests": 0}
    [card] = client.get("/v1/models").json()["data"]
    assert card["id"] == MODEL and card["output_modalities"] == ["text", "audio", "image", "video"]
    page = client.get("/")
    assert page.status_code == 200 and "<title>mllm chat</title>" in page.text


def test_text_only(client):
    r = client.post("/v1/chat/completions", json=request("Hello there.", seed=0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert isinstance(body["choices"][0]["message"]["content"], str) and body["usage"]["prompt_tokens"] > 0
    again = client.post("/v1/chat/completions", json=request("Hello there.", seed=0)).json()
    assert again["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]  # greedy


def test_each_medium_in(client, mp4_bytes):
    video = {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{b64(mp4_bytes)}"}}
    audio_url = {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{b64(wav_bytes())}"}}
    for content in ([image_part(), {"type": "text", "text": "What is this?"}], [audio_part()], [video], [audio_url],
                    [image_part(), image_part(), {"type": "text", "text": "Compare."}]):
        r = client.post("/v1/chat/completions", json=request(content))
        assert r.status_code == 200, r.text


def test_a_video_is_decoded_as_the_models_tokenizer_reads_it(pipeline, mp4_bytes, monkeypatch):
    """Only the frames the video tokenizer samples are converted and held (the toy reads the first and last)."""
    import mllm.serve.openai_schema as schema

    monkeypatch.setattr(ToyVideoTokenizer, "load_options", {"even_frames": 2})
    loaded = []
    monkeypatch.setattr(schema, "load_media", lambda *a, **k: loaded.append(load_media(*a, **k)) or loaded[-1])
    video = {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{b64(mp4_bytes)}"}}
    with TestClient(create_app(pipeline, LIMITS, MODEL)) as client:
        assert client.post("/v1/chat/completions", json=request([video])).status_code == 200
    whole = load_media(mp4_bytes, "video")
    assert whole.num_frames == 4 and [v.num_frames for v in loaded] == [2]
    assert np.array_equal(loaded[0].frames, whole.frames[[0, -1]])


def test_a_reply_writes_media_only_when_modalities_asks(pipeline):
    """OpenAI's modalities default to ["text"] and its clients expect a string content: without them the model
    may not open a medium (before, it could, and the reply became a list of parts)."""
    server = create_app(pipeline, LIMITS, MODEL).state.server
    plain, asked, either = (server.prepare(json.dumps(request("Draw.", **extra)).encode())[0] for extra in (
        {}, {"modalities": ["text", "image"]}, {"modalities": ["text", "image", "audio"]}))
    assert plain.config.writes == [] and plain.force is None
    assert asked.config.writes == ["image"] and asked.force == "image"  # one medium: the reply opens with it
    assert either.config.writes == ["image", "audio"] and either.force is None  # several: where the model chooses
    with pytest.raises(ValueError, match=r"force='image': the reply may not write it"):
        pipeline.chat([plain.messages], plain.config, force="image")


def test_each_medium_is_encoded_once_and_the_request_keeps_its_tokens(pipeline, monkeypatch):
    # the token count and the reply each ran the processor over the decoded media: every medium encoded twice,
    # the second time under the generation lock, and the decoded media held while the request waited its turn
    tokenizer = pipeline.processor.media_tokenizers["image"]
    calls = []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda media: calls.append(1) or encode(media))
    with TestClient(create_app(pipeline, LIMITS, MODEL)) as client:
        r = client.post("/v1/chat/completions", json=request([image_part(), {"type": "text", "text": "What is it?"}]))
        assert r.status_code == 200, r.text
    assert len(calls) == 1
    server = create_app(pipeline, LIMITS, MODEL).state.server
    req, _, _ = server.prepare(json.dumps(request([image_part()])).encode())
    [part] = req.messages[0]["content"]
    assert set(part) == {"type", "tokens"} and torch.is_tensor(part["tokens"])


def test_local_path_under_the_allowed_folder(client):
    (client.allowed / "cat.png").write_bytes(png_bytes())
    for url in (f"file://{client.allowed}/cat.png", str(client.allowed / "cat.png")):
        r = client.post("/v1/chat/completions", json=request([{"type": "image_url", "image_url": {"url": url}}]))
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("modality, kind", [("image", Image), ("audio", Audio), ("video", Video)])
def test_each_medium_out(client, modality, kind):
    r = client.post("/v1/chat/completions", json=request("Make one.", modalities=["text", modality], max_tokens=12))
    assert r.status_code == 200, r.text
    parts = r.json()["choices"][0]["message"]["content"]
    media = [p for p in parts if p["type"] != "text"]
    assert media and media[0]["type"] == f"{modality}_url"
    assert isinstance(decode_part(media[0]), kind)


def test_a_generated_image_goes_back_in_as_history(client):
    first = client.post("/v1/chat/completions", json=request("Draw.", modalities=["text", "image"], max_tokens=8)).json()
    reply = first["choices"][0]["message"]
    messages = [{"role": "user", "content": "Draw."}, reply, {"role": "user", "content": "Again, smaller."}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4})
    assert r.status_code == 200, r.text


def sse(response) -> list[dict | str]:
    events = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: ")
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streaming_text_then_media_then_done(client):
    body = request([image_part(), {"type": "text", "text": "Draw it back."}], modalities=["text", "image"],
                   stream=True, max_tokens=10, seed=3)
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        r.read()
    events = sse(r)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    chunks = events[1:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # the untrained model writes on past 10 tokens
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks[:-1]]
    media = [p for d in deltas if isinstance(d, list) for p in d]
    assert len(media) == 1 and isinstance(decode_part(media[0]), Image)
    text = "".join(d for d in deltas if isinstance(d, str))
    [plain] = client.post("/v1/chat/completions", json={**body, "stream": False}).json()["choices"]
    assert text == "".join(p["text"] for p in plain["message"]["content"] if p["type"] == "text")  # the stream says
    assert plain["finish_reason"] == "length"  # what the reply says


def test_a_reply_ends_before_its_stop_string_streamed_or_not(client):
    """As OpenAI's: the text stops before the first stop string and never holds it, though the engine stops
    only once the stop was written (and a stream had sent all of it)."""
    whole = client.post("/v1/chat/completions", json=request("Hello there.", max_tokens=12)).json()
    text = whole["choices"][0]["message"]["content"]
    stop = text[4:7]
    body = request("Hello there.", max_tokens=12, stop=["never written", stop])
    [plain] = client.post("/v1/chat/completions", json=body).json()["choices"]
    assert plain["message"]["content"] == text[:text.index(stop)] and plain["finish_reason"] == "stop"
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.read()
    chunks = sse(r)[1:-1]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text[:text.index(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_stop_filter_holds_back_what_may_begin_a_stop_string_until_it_does_not():
    stops = StopFilter(["abc"])
    assert [stops.text(d) for d in ("xa", "b", "d", "ab")] == ["x", "", "abd", ""]
    assert stops.flush() == "ab"  # a medium or the end: no stop came
    assert [stops.text(d) for d in ("a", "bcz")] == ["", ""] and stops.flush() == ""
    assert cut("one abc two abc", ["two", "abc"]) == "one "


# ---- malformed requests: each a 4xx with a message, and the server stays up -------------------


def _bad_cases(tmp: Path) -> dict[str, tuple[int, dict | bytes]]:
    outside = tmp / "secret.png"
    outside.write_bytes(png_bytes())
    big = image_part(b"\x89PNG" + bytes(160_000))
    hi = json.dumps(request("Hi."))  # for numbers json.dumps does not write
    return {
        "invalid JSON": (400, b'{"model": "tiny", "messages": ['),
        "JSON not an object": (400, b'["hello"]'),
        "unknown model": (404, {**request("Hi."), "model": "gpt-9"}),
        "no messages": (400, {"model": MODEL}),
        "empty messages": (400, {"model": MODEL, "messages": []}),
        "bad role": (400, {"model": MODEL, "messages": [{"role": "wizard", "content": "Hi."}]}),
        "content not a list": (400, {"model": MODEL, "messages": [{"role": "user", "content": 42}]}),
        "unknown part type": (400, request([{"type": "hologram", "hologram": {}}])),
        "text part without text": (400, request([{"type": "text"}])),
        "bad base64": (400, request([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}}])),
        "wrong MIME type": (400, request([image_part(mime="application/pdf")])),
        "audio sent as image": (400, request([image_part(wav_bytes(), mime="image/png")])),
        "not a data URL": (400, request([{"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}])),
        "remote URL": (400, request([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}])),
        "local path outside the allowed folder": (403, request([{"type": "image_url", "image_url": {"url": str(outside)}}])),
        "unknown audio format": (400, request([{"type": "input_audio", "input_audio": {"data": b64(wav_bytes()), "format": "midi"}}])),
        "corrupt image": (400, request([image_part(b"\x89PNG\r\n\x1a\nnot really")])),
        "oversized data": (413, request([big])),
        "too many images": (400, request([image_part(), image_part(), image_part()])),
        "too many audio clips": (400, request([audio_part(), audio_part()])),
        "max_tokens not an integer": (400, request("Hi.", max_tokens="lots")),
        "max_tokens zero": (400, request("Hi.", max_tokens=0)),
        "negative temperature": (400, request("Hi.", temperature=-1)),
        "NaN temperature": (400, json.dumps(request("Hi.", temperature=float("nan"))).encode()),
        "Infinity top_p": (400, json.dumps(request("Hi.", top_p=float("inf"))).encode()),
        "temperature 1e400": (400, hi.replace('"max_tokens"', '"temperature": 1e400, "max_tokens"').encode()),
        "temperature past float's range": (400, request("Hi.", temperature=10**400)),
        "an integer of 5000 digits": (400, hi.replace('8}', f'{"9" * 5000}}}').encode()),
        "JSON nested too deep": (400, b"[" * 100_000),
        "seed 2**64": (400, request("Hi.", seed=2**64)),
        "seed 10**23": (400, request("Hi.", seed=10**23)),
        "negative seed": (400, request("Hi.", seed=-1)),
        "top_p out of range": (400, request("Hi.", top_p=1.5)),
        "stream not a boolean": (400, request("Hi.", stream="yes")),
        "n above one": (400, request("Hi.", n=3)),
        "stream_options without stream": (400, request("Hi.", stream_options={"include_usage": True})),
        "stream_options not an object": (400, request("Hi.", stream=True, stream_options=True)),
        "include_usage not a boolean": (400, request("Hi.", stream=True, stream_options={"include_usage": "yes"})),
        "stop not strings": (400, request("Hi.", stop=[1, 2])),
        "an empty stop string": (400, request("Hi.", stop=["\n", ""])),
        "unknown output modality": (400, request("Hi.", modalities=["text", "smell"])),
        "max_tokens over max_total_tokens": (400, request("Hi.", max_tokens=1000)),
        "prompt over max_input_tokens": (400, request("word " * 400)),
    }


def test_malformed_requests_get_4xx_with_a_message_and_the_server_stays_up(client, tmp_path):
    cases = _bad_cases(tmp_path)
    assert len(cases) >= 10
    for name, (status, body) in cases.items():
        if isinstance(body, bytes):
            r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        error = r.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error", name
    assert_alive(client)


def test_options_the_server_cannot_meet_are_refused_by_name_and_their_no_op_values_accepted(client):
    """A client asking for logprobs, tools or JSON mode would otherwise get a plain reply that silently lacks them."""
    asks = {"logprobs": True, "top_logprobs": 3, "tools": [{"type": "function", "function": {"name": "f"}}],
            "response_format": {"type": "json_object"}, "presence_penalty": 0.5, "frequency_penalty": -1,
            "logit_bias": {"50": 100}}
    for key, value in asks.items():
        r = client.post("/v1/chat/completions", json=request("Hi.", **{key: value}))
        assert r.status_code == 400 and r.json()["error"]["param"] == key, f"{key}: {r.text}"
        assert f"'{key}' is not supported" in r.json()["error"]["message"]
    no_ops = {"logprobs": False, "top_logprobs": None, "tools": [], "response_format": {"type": "text"},
              "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}}
    assert client.post("/v1/chat/completions", json=request("Hi.", **no_ops)).status_code == 200


def test_a_body_over_max_request_bytes_is_refused_before_parsing(client):
    r = client.post("/v1/chat/completions", content=b"x" * 300_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]
    assert_alive(client)


def test_wrong_methods_and_paths_are_4xx(client):
    for r, status in ((client.get("/v1/chat/completions"), 405), (client.post("/v1/completions", json={}), 404)):
        assert r.status_code == status and r.json()["error"]["message"]
    assert_alive(client)


# ---- audio transcriptions (multipart, as OpenAI's /v1/audio/transcriptions) ------------------------


def transcribe(client: TestClient, data: bytes | None = None, **fields):
    files = {"file": ("clip.wav", wav_bytes() if data is None else data, "audio/wav")}
    return client.post("/v1/audio/transcriptions", data={"model": MODEL, **fields}, files=files)


def test_a_recording_is_transcribed_as_json_or_text(client, pipeline):
    message = [{"role": "user", "content": [{"type": "audio", "media": load_media(wav_bytes(), "audio")},
                                            {"type": "text", "text": "Transcribe the audio."}]}]
    [expected] = pipeline.transcribe([message], max_new_tokens=96)
    r = transcribe(client)
    assert r.status_code == 200 and r.json() == {"text": expected}, r.text
    r = transcribe(client, response_format="text")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain") and r.text == expected
    assert_alive(client)


def test_malformed_transcription_requests_get_4xx_and_the_server_stays_up(client):
    url = "/v1/audio/transcriptions"
    cases = {
        "no file": (400, "'file' is required", client.post(url, files={"model": (None, MODEL)})),
        "file as a text field": (400, "'file' is required",
                                 client.post(url, files={"model": (None, MODEL), "file": (None, "clip.wav")})),
        "a form that is not multipart": (400, "multipart/form-data", client.post(url, data={"model": MODEL})),
        "JSON body": (400, "multipart/form-data", client.post(url, json={"model": MODEL, "file": b64(wav_bytes())})),
        "broken multipart": (400, "multipart", client.post(url, content=b"--nope\r\ngarbage",
                                                           headers={"content-type": "multipart/form-data; boundary=b"})),
        "corrupt recording": (400, "cannot read the audio", transcribe(client, b"RIFF\x00\x00not a wave")),
        "empty recording": (400, "cannot read the audio", transcribe(client, b"")),
        "an image for a recording": (400, "cannot read the audio", transcribe(client, png_bytes())),
        "unknown model": (404, "does not exist", transcribe(client, model="whisper-9")),
        "unknown format": (400, "response_format", transcribe(client, response_format="srt")),
        "another language": (400, "English only", transcribe(client, language="fr")),
        "a sampling temperature": (400, "only 0", transcribe(client, temperature="0.7")),
        "temperature not a number": (400, "must be a number", transcribe(client, temperature="warm")),
        "an unsupported field": (400, "unsupported field(s) ['prompt']", transcribe(client, prompt="Hi.")),
        "over max_request_bytes": (413, "max_request_bytes", transcribe(client, b"RIFF" + bytes(250_000))),
    }
    for name, (status, words, r) in cases.items():
        assert r.status_code == status and words in r.json()["error"]["message"], f"{name}: {r.status_code} {r.text}"
    assert_alive(client)


def test_a_model_that_does_not_hear_refuses_transcriptions(image_checkpoint):
    with TestClient(create_app(Pipeline.from_pretrained(image_checkpoint), model_name=MODEL)) as client:
        r = transcribe(client)
        assert r.status_code == 400 and "does not read audio" in r.json()["error"]["message"]


def test_a_slow_transcription_times_out_with_504_and_frees_its_slot(pipeline):
    app = create_app(pipeline, ServeLimits(request_timeout_s=0.3, max_concurrent_requests=1), MODEL)
    server = app.state.server
    with TestClient(app) as client:
        with server.generate_lock:
            r = transcribe(client)
            assert r.status_code == 504 and "request_timeout_s" in r.json()["error"]["message"]
            assert transcribe(client).status_code == 429  # the timed-out one holds its slot until its worker stops
        _wait(lambda: server.active == 0)
        server.limits = replace(server.limits, request_timeout_s=60.0)  # the slot is free; no race with the clock
        assert transcribe(client).status_code == 200


# ---- concurrency and timeout -----------------------------------------------------------------


def _wait(predicate, seconds: float = 10) -> None:
    end = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def test_a_full_server_answers_429_and_recovers(pipeline):
    app = create_app(pipeline, ServeLimits(max_concurrent_requests=1, max_input_tokens=200, max_total_tokens=300), MODEL)
    server = app.state.server
    with TestClient(app) as client:
        results = []
        with server.generate_lock:  # the first request is admitted, then waits for the model
            first = threading.Thread(target=lambda: results.append(client.post("/v1/chat/completions", json=request("One."))))
            first.start()
            _wait(lambda: server.active == 1)
            busy = client.post("/v1/chat/completions", json=request("Two."))
            assert busy.status_code == 429 and "max_concurrent_requests" in busy.json()["error"]["message"]
        first.join()
        assert results[0].status_code == 200
        _wait(lambda: server.active == 0)
        assert_alive(client)


def test_a_slow_request_times_out_with_504_and_frees_its_slot(pipeline):
    app = create_app(pipeline, ServeLimits(request_timeout_s=0.3, max_concurrent_requests=1, max_input_tokens=200,
                                           max_total_tokens=300), MODEL)
    server = app.state.server
    with TestClient(app) as client:
        with server.generate_lock:
            r = client.post("/v1/chat/completions", json=request("Slow."))
            assert r.status_code == 504 and "request_timeout_s" in r.json()["error"]["message"]
        _wait(lambda: server.active == 0)
        with server.generate_lock:
            with client.stream("POST", "/v1/chat/completions", json=request("Slow.", stream=True)) as streamed:
                streamed.read()
        events = sse(streamed)
        assert events[-2]["error"]["code"] == "timeout" and events[-1] == "[DONE]"
        _wait(lambda: server.active == 0)
        server.limits = replace(server.limits, request_timeout_s=60.0)  # the slot is free; no race with the clock
        assert_alive(client)


def test_a_request_fits_the_models_own_positions_where_they_are_fewer(pipeline):
    # the tiny LM has 512 positions: a request without max_tokens was given 4608 - prompt by default, and ran
    # past them into garbage (RoPE does not stop it) until the timeout
    server = create_app(pipeline, ServeLimits(), MODEL).state.server
    unbounded = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi."}]}).encode()
    req, prompt, new = server.prepare(unbounded)
    assert prompt + new == 512
    with pytest.raises(RequestError, match=r"over the model's max_position_embeddings \(512\)") as e:
        server.prepare(json.dumps(request("Hi.", max_tokens=600)).encode())
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    server.limits = replace(server.limits, max_total_tokens=300, max_input_tokens=200)  # the smaller bound rules
    assert sum(server.prepare(unbounded)[1:]) == 300


def test_limits_validate_and_parse_like_vllm():
    assert parse_mm_limits('{"image": 4, "video": 1}') == {"image": 4, "video": 1}
    assert parse_mm_limits("image=2,audio=0") == {"image": 2, "audio": 0}
    with pytest.raises(ValueError, match="unknown modalities"):
        ServeLimits(limit_mm_per_prompt={"smell": 1})
    with pytest.raises(ValueError, match="must exceed max_input_tokens"):
        ServeLimits(max_input_tokens=100, max_total_tokens=50)
    with pytest.raises(ValueError, match="modality=count"):
        parse_mm_limits("image:4")
    for timeout in (0.0, float("nan"), float("inf")):  # NaN passed `<= 0`, and made every deadline NaN
        with pytest.raises(ValueError, match="request_timeout_s must be positive and finite"):
            ServeLimits(request_timeout_s=timeout)


def test_a_413_names_the_limit_the_loader_hit():
    from mllm.serve.openai_schema import _limit_hit

    # the sample bound of many-channel audio was reported as max_request_bytes, as the byte limit is
    assert _limit_hit("too many samples: 48000 samples × 8 channels exceed 100000", "audio") == "MediaLimits.max_samples"
    assert _limit_hit("too large: over 100 bytes", "image") == "max_request_bytes"
    assert _limit_hit("too long: audio of 700 s exceeds 600 s", "audio") == "MediaLimits.max_duration_s"
    assert _limit_hit("not a PNG", "image") is None


def test_a_port_in_use_is_refused_at_once_naming_it(image_checkpoint, capsys, monkeypatch):
    import socket

    from mllm.cli import main

    loaded = []
    monkeypatch.setattr(Pipeline, "from_pretrained", lambda *a, **k: loaded.append(a))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(image_checkpoint), "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip() == f"mllm serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not loaded  # refused before the model loads


def test_timeouts_are_caught_as_asyncio_raises_them_before_python_3_11(pipeline, monkeypatch):
    """asyncio.wait_for raises asyncio.TimeoutError, which is not the builtin TimeoutError before 3.11 (pyproject
    allows 3.10): app.py's asyncio is swapped for one whose wait_for raises such a distinct class."""
    import asyncio
    import types

    import mllm.serve.app as app_module

    class OldTimeoutError(Exception):
        pass

    async def wait_for(awaitable, timeout):
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except TimeoutError as e:
            raise OldTimeoutError from e

    old = types.ModuleType("asyncio")
    old.__dict__.update(vars(asyncio), wait_for=wait_for, TimeoutError=OldTimeoutError)
    monkeypatch.setattr(app_module, "asyncio", old)
    app = create_app(pipeline, ServeLimits(request_timeout_s=0.3, max_input_tokens=200, max_total_tokens=300), MODEL)
    server = app.state.server
    with TestClient(app) as client:
        with server.generate_lock:
            r = client.post("/v1/chat/completions", json=request("Slow."))
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
            with client.stream("POST", "/v1/chat/completions", json=request("Slow.", stream=True)) as streamed:
                streamed.read()
            assert sse(streamed)[-2]["error"]["code"] == "timeout"
            r = transcribe(client)
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        _wait(lambda: server.active == 0)


def asgi_post(app, path: str, chunks: list[bytes], then: str, seconds: float = 5) -> tuple[int, dict]:
    """POST the body in `chunks` straight to the ASGI app, as a raw client would; after them the client
    "hangs" (sends no more of the body, stays connected) or "leaves" (the body was whole; it disconnects)."""
    import asyncio

    async def run() -> tuple[int, dict]:
        messages = [{"type": "http.request", "body": c, "more_body": then == "hangs" or k < len(chunks) - 1}
                    for k, c in enumerate(chunks)]
        sent = []

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            if then == "leaves":
                return {"type": "http.disconnect"}
            await asyncio.sleep(3600)

        async def send(message: dict) -> None:
            sent.append(message)

        headers = [(b"host", b"test"), (b"content-type", b"application/json")]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
                 "client": ("127.0.0.1", 1), "server": ("test", 80)}
        await asyncio.wait_for(app(scope, receive, send), seconds)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))

    return asyncio.run(run())


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/audio/transcriptions"])
def test_a_body_that_stops_arriving_gets_408_and_frees_its_slot(pipeline, path):
    app = create_app(pipeline, ServeLimits(request_timeout_s=0.3, max_concurrent_requests=1), MODEL)
    status, body = asgi_post(app, path, [b'{"messages": [{"role": "us'], then="hangs")
    assert status == 408 and "request_timeout_s" in body["error"]["message"], body
    assert app.state.server.active == 0
    app.state.server.executor.shutdown()


def test_media_preparation_counts_against_the_timeout_and_holds_the_slot_until_done(pipeline, monkeypatch):
    app = create_app(pipeline, ServeLimits(request_timeout_s=0.3, max_concurrent_requests=1, max_input_tokens=200,
                                           max_total_tokens=300), MODEL)
    server, loading = app.state.server, threading.Event()
    prepare = server.prepare
    monkeypatch.setattr(server, "prepare", lambda body: loading.wait(10) and prepare(body))  # media that load slowly
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json=request([image_part()]))
        assert r.status_code == 504 and "request_timeout_s" in r.json()["error"]["message"], r.text
        assert server.active == 1  # its worker still loads the media
        loading.set()
        _wait(lambda: server.active == 0)


def test_a_client_that_leaves_a_non_streaming_request_stops_its_generation(pipeline, monkeypatch):
    tokens = []

    def chatty(conversations, config, *, on_text, **kwargs):  # a token every 50 ms for 20 s, unless stopped
        for _ in range(400):
            time.sleep(0.05)
            on_text(0, "x")
            tokens.append(1)
        return [["x" * 400]]

    monkeypatch.setattr(pipeline, "chat", chatty)
    app = create_app(pipeline, ServeLimits(max_input_tokens=200, max_total_tokens=300), MODEL)
    server = app.state.server
    status, body = asgi_post(app, "/v1/chat/completions", [json.dumps(request("Bye.")).encode()], then="leaves")
    assert status == 499 and body["error"]["code"] == "client_closed"
    _wait(lambda: server.active == 0, seconds=2)
    assert len(tokens) < 100  # stopped at a token soon after the client left, not after all 400
    server.executor.shutdown()


def test_a_server_side_failure_is_a_500_not_the_clients_fault(pipeline, monkeypatch):
    app = create_app(pipeline, LIMITS, MODEL)
    monkeypatch.delitem(pipeline.detokenizers, "image")  # Pipeline.decode then raises KeyError: the server's own fault
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json=request("Draw.", modalities=["text", "image"], max_tokens=12))
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
        assert "no image de-tokenizer" in r.json()["error"]["message"]


def test_media_that_decode_past_the_servers_limits_get_413_naming_the_limit(pipeline, mp4_bytes):
    """The 4-frame 16x16 clip and the 8x8 image pass at their sizes and are refused one below."""
    video = {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{b64(mp4_bytes)}"}}
    app = create_app(pipeline, LIMITS, MODEL)
    server = app.state.server
    with TestClient(app) as client:
        for limit, size, part in (("max_image_pixels", 64, image_part()), ("max_video_frames", 4, video),
                                  ("max_video_frame_pixels", 256, video)):
            server.limits = replace(LIMITS, **{limit: size})
            assert client.post("/v1/chat/completions", json=request([part])).status_code == 200, limit
            server.limits = replace(LIMITS, **{limit: size - 1})
            r = client.post("/v1/chat/completions", json=request([part]))
            error = r.json()["error"]
            assert r.status_code == 413 and error["code"] == "media_too_large" and f"({limit})" in error["message"], r.text
        assert server.active == 0


def test_serve_flags_set_the_media_limits(monkeypatch):
    import mllm.serve.app
    from mllm.cli import main

    served = []
    monkeypatch.setattr(mllm.serve.app, "serve", lambda model, **kw: served.append(kw["limits"]))
    assert main(["serve", "--model", "ckpt", "--max-image-pixels", "100", "--max-video-frames", "7",
                 "--max-video-frame-pixels", "50"]) == 0
    assert (served[0].max_image_pixels, served[0].max_video_frames, served[0].max_video_frame_pixels) == (100, 7, 50)


def test_include_usage_streams_the_usage_last(client):
    body = request("Hello there.", seed=0)
    usage = client.post("/v1/chat/completions", json=body).json()["usage"]
    with client.stream("POST", "/v1/chat/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.read()
    *chunks, last, done = sse(r)
    assert done == "[DONE]" and last["choices"] == [] and last["usage"] == usage and usage["prompt_tokens"] > 0
    assert all(c["usage"] is None for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]


@pytest.mark.parametrize("max_tokens", [3, 6])
def test_usage_counts_the_generated_tokens_as_max_tokens_does(client, max_tokens):
    body = client.post("/v1/chat/completions", json=request("Hello there.", seed=0, max_tokens=max_tokens)).json()
    usage, finish = body["usage"], body["choices"][0]["finish_reason"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] == max_tokens if finish == "length" else 0 < usage["completion_tokens"] < max_tokens


def test_an_address_that_cannot_be_resolved_is_named_with_the_resolvers_reason(monkeypatch):
    import socket

    from mllm.serve.app import ListenError, listening_socket

    def unresolvable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "create_server", unresolvable)
    with pytest.raises(ListenError) as error:
        listening_socket("999.1.1.1", 8000)
    assert str(error.value) == "cannot listen on 999.1.1.1:8000: Name or service not known"
