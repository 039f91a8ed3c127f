"""`mllm demo`: every path of the embedded default model, on the built-in test split, in about a minute.

    image -> caption, image -> answer, text -> image (GMM head and diffusion head), speech -> text,
    text -> speech, sound -> caption, video -> answer, text -> video, one multi-turn interleaved conversation

Inputs come from the test split of the built corpora (`mllm data build`), the
same items every run; generation is seeded, so the page is reproducible. It
writes `<out>/index.html` (every medium inline, also saved under
`<out>/media/`) and prints one line per path. A path whose modality the
checkpoint cannot read or write (video, for a default without a video
tokenizer), or whose corpus is not built, is listed as not available, never
faked.
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path

from mllm.data.corpora import DIGIT_WORDS, first_test_record
from mllm.data.corpora.build import check_corpora
from mllm.files import atomic_write_text
from mllm.generation import GenerationConfig
from mllm.media import Audio, Image, Video, save_audio, save_image, save_video
from mllm.pipeline import Pipeline

MIME = {".png": "image/png", ".wav": "audio/wav", ".mp4": "video/mp4"}


@dataclass
class Turn:
    role: str
    parts: list[str | Image | Audio | Video | Path]  # text, generated media, or a corpus file


@dataclass
class Showcase:
    """One path: its conversation (the last reply is the model's), the truth, how long it took."""

    path: str
    turns: list[Turn] = field(default_factory=list)
    truth: str = ""
    seconds: float = 0.0
    unavailable: str = ""  # why this checkpoint cannot run the path


def _message(role: str, parts: list, base: Path | None = None) -> dict:
    content = []
    for part in parts:
        if isinstance(part, str):
            content.append({"type": "text", "text": part})
        elif isinstance(part, Path):
            content.append({"type": {".png": "image", ".wav": "audio", ".mp4": "video"}[part.suffix], "path": str(part)})
        else:
            content.append({"type": type(part).__name__.lower(), "media": part})
    return {"role": role, "content": content}


def _user_parts(record: dict, corpora: Path, turn: int = 0) -> list[str | Path]:
    return [p["text"] if p["type"] == "text" else corpora / record["corpus"] / p["path"]
            for p in record["messages"][turn]["content"]]


class Demo:
    def __init__(self, corpora: Path, pipelines: dict[str, Pipeline], seed: int):
        self.corpora, self.pipelines, self.seed = corpora, pipelines, seed

    def reply(self, variant: str, turns: list[Turn], force: str | None, max_new_tokens: int,
              transcribe: bool = False) -> list:
        pipe = self.pipelines[variant]
        conversation = [_message(t.role, t.parts) for t in turns]
        if transcribe:
            return [pipe.transcribe([conversation], max_new_tokens=max_new_tokens)[0]]
        config = GenerationConfig(max_new_tokens=max_new_tokens, seed=self.seed)
        [reply] = pipe.chat([conversation], config, force=force)
        return [item.strip() if isinstance(item, str) else item for item in reply if not isinstance(item, str) or item.strip()]

    def can(self, variant: str, *modalities: str) -> str:
        """'' if the variant reads and writes these modalities, else why not."""
        known = self.pipelines[variant].processor.layout.modalities
        missing = [m for m in modalities if m not in known]
        return f"this checkpoint has no {missing[0]} tokenizer" if missing else ""

    def run(self, path: str, record: dict, parts: list, truth: str, *, variant: str = "gmm", force: str | None = None,
            max_new_tokens: int = 24, needs: tuple[str, ...] = (), transcribe: bool = False) -> Showcase:
        show = Showcase(path, [Turn("user", parts)], truth, unavailable=self.can(variant, *needs))
        if not show.unavailable:
            started = time.perf_counter()
            show.turns.append(Turn("assistant", self.reply(variant, show.turns, force, max_new_tokens, transcribe)))
            show.seconds = time.perf_counter() - started
        return show

    def missing(self, corpus: str) -> str:
        """'' if the corpus's test split is built (`mllm data build --only` may leave it out), else that it is not."""
        return "" if (self.corpora / corpus / "test.jsonl").is_file() else f"the {corpus} corpus is not built"

    def all(self) -> list[Showcase]:
        return [*self.digits(self.corpora), *self.speech(self.corpora), self.sound(self.corpora),
                *self.video(self.corpora), self.conversation(self.corpora)]

    def digits(self, c: Path) -> list[Showcase]:
        paths = ("image → caption", "image → answer", "text → image (GMM head)", "text → image (diffusion head)")
        if reason := self.missing("digits"):
            return [Showcase(path, unavailable=reason) for path in paths]
        caption = first_test_record(c, "digits", "image_caption")
        qa = first_test_record(c, "digits", "image_qa", lambda r: r["meta"]["question_type"] == "digit")
        draw = first_test_record(c, "digits", "image_generation")
        return [
            self.run(paths[0], caption, _user_parts(caption, c), caption["meta"]["caption"], needs=("image",)),
            self.run(paths[1], qa, _user_parts(qa, c), qa["meta"]["answer"], needs=("image",)),
            self.run(paths[2], draw, _user_parts(draw, c), f"a {draw['meta']['label']}",
                     force="image", max_new_tokens=80, needs=("image",)),
            self.run(paths[3], draw, _user_parts(draw, c), f"a {draw['meta']['label']}",
                     variant="diffusion", force="image", max_new_tokens=80, needs=("image",)),
        ]

    def speech(self, c: Path) -> list[Showcase]:
        paths = ("speech → text", "text → speech")
        if reason := self.missing("speech"):
            return [Showcase(path, unavailable=reason) for path in paths]
        asr = first_test_record(c, "speech", "asr", lambda r: r["meta"]["kind"] == "digits")
        tts = first_test_record(c, "speech", "tts", lambda r: r["meta"]["transcript"] in DIGIT_WORDS)
        return [
            self.run(paths[0], asr, _user_parts(asr, c), asr["meta"]["transcript"], needs=("audio",), transcribe=True),
            self.run(paths[1], tts, _user_parts(tts, c), f"the word {tts['meta']['transcript']!r}",
                     force="audio", max_new_tokens=80, needs=("audio",)),
        ]

    def sound(self, c: Path) -> Showcase:
        if reason := self.missing("sounds"):
            return Showcase("sound → caption", unavailable=reason)
        sound = first_test_record(c, "sounds", "sound_caption")
        return self.run("sound → caption", sound, _user_parts(sound, c), sound["meta"]["caption"], needs=("audio",))

    def video(self, c: Path) -> list[Showcase]:
        paths = ("video → answer", "text → video")
        if reason := self.can("gmm", "video") or self.missing("video"):
            return [Showcase(path, unavailable=reason) for path in paths]
        qa = first_test_record(c, "video", "video_qa", lambda r: r["meta"]["question_type"] == "direction")
        make = first_test_record(c, "video", "video_generation", lambda r: r["meta"]["num_digits"] == 1)
        return [self.run(paths[0], qa, _user_parts(qa, c), qa["meta"]["answer"], needs=("video",)),
                self.run(paths[1], make, _user_parts(make, c), make["meta"]["prompt"],
                         force="video", max_new_tokens=80, needs=("video",))]

    def conversation(self, c: Path) -> Showcase:
        """A two-turn test conversation: read a digit and say it; then draw another. The model opens every medium
        itself."""
        if reason := self.missing("interleaved"):
            return Showcase("interleaved conversation", unavailable=reason)
        record = first_test_record(c, "interleaved", "interleaved", lambda r: r["meta"]["template"] == "read_then_draw")
        read, drawn = record["meta"]["digits"]
        show = Showcase("interleaved conversation", [Turn("user", _user_parts(record, c))],
                        f"{read}, spoken; then a {drawn}, drawn", unavailable=self.can("gmm", "image", "audio"))
        if show.unavailable:
            return show
        started = time.perf_counter()
        show.turns.append(Turn("assistant", self.reply("gmm", show.turns, None, 100)))
        show.turns.append(Turn("user", _user_parts(record, c, turn=2)))
        show.turns.append(Turn("assistant", self.reply("gmm", show.turns, None, 150)))
        show.seconds = time.perf_counter() - started
        return show


# ---- the page -------------------------------------------------------------------------------------------------


def _save(item: Image | Audio | Video, media: Path, name: str) -> Path:
    if isinstance(item, Image):
        return save_image(item, media / f"{name}.png")
    if isinstance(item, Audio):
        return save_audio(item, media / f"{name}.wav")
    return save_video(item, media / f"{name}.mp4")


def _inline(path: Path) -> str:
    data = f"data:{MIME[path.suffix]};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
    if path.suffix == ".png":
        return f'<img src="{data}" width="96" style="image-rendering:pixelated">'
    if path.suffix == ".wav":
        return f'<audio controls src="{data}"></audio>'
    return f'<video controls loop autoplay muted src="{data}" width="128"></video>'


def _part(part, media: Path, name: str) -> tuple[str, str]:
    """(HTML, one-line text) of one part."""
    if isinstance(part, str):
        return f"<p>{html.escape(part)}</p>", repr(part)
    path = part if isinstance(part, Path) else _save(part, media, name)
    return _inline(path), f"[{path.suffix[1:]}]"


def write_page(shows: list[Showcase], out: Path, title: str) -> tuple[Path, list[str]]:
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    cards, lines = [], []
    for s, show in enumerate(shows):
        if show.unavailable:
            cards.append(f"<section><h2>{html.escape(show.path)}</h2><p><em>not available: {html.escape(show.unavailable)}</em></p></section>")
            lines.append(f"  {show.path:<30} not available: {show.unavailable}")
            continue
        rows, said = [], []
        for t, turn in enumerate(show.turns):
            rendered = [_part(p, media, f"{s:02d}-{t}-{k}") for k, p in enumerate(turn.parts)]
            rows.append(f'<div class="{turn.role}"><b>{turn.role}</b>{"".join(h for h, _ in rendered)}</div>')
            if turn.role == "assistant":
                said.append(" ".join(text for _, text in rendered) or "(nothing)")
        cards.append(f"<section><h2>{html.escape(show.path)}</h2>{''.join(rows)}"
                     f"<p class=truth>expected: {html.escape(show.truth)} · {show.seconds:.1f} s</p></section>")
        lines.append(f"  {show.path:<30} {' | '.join(said)}   (expected {show.truth}; {show.seconds:.1f} s)")
    style = ("body{font-family:sans-serif;max-width:52em;margin:2em auto}section{border:1px solid #ccc;border-radius:6px;"
             "padding:.5em 1em;margin:1em 0}.user,.assistant{display:flex;gap:1em;align-items:center;margin:.3em 0}"
             ".assistant{background:#f3f7ff}.truth{color:#666;font-size:90%}")
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{style}</style>"
            f"<h1>{html.escape(title)}</h1>{''.join(cards)}")
    index = out / "index.html"
    atomic_write_text(index, page)
    return index, lines


def run_demo(corpora: Path, out: Path, model: Path, diffusion_model: Path, seed: int = 0) -> int:
    check_corpora(corpora)
    started = time.perf_counter()
    paths = {"gmm": model, "diffusion": diffusion_model}
    pipelines = {variant: Pipeline.from_pretrained(path) for variant, path in paths.items()}
    shows = Demo(corpora, pipelines, seed).all()
    index, lines = write_page(shows, out, "mllm demo: the embedded default model")
    ran = sum(not s.unavailable for s in shows)
    print(f"mllm demo: {ran} of {len(shows)} paths ran on {paths['gmm']} (+ its diffusion-head variant)")
    print("\n".join(lines))
    print(f"page: {index} ({time.perf_counter() - started:.0f} s in all)")
    return 0
