"""`mllm chat`: a terminal chat with a checkpoint, text streamed, media attached and saved by path.

    mllm chat --model runs/x/checkpoint
    you> /attach cat.png meow.wav
    you> What is in these?
    mllm> A cat, and the sound it makes.

Scripted: `mllm chat --model M --attach cat.png --message "What is this?" [--message "And now?"]`
prints each reply and exits. Generated media are written to `--media-dir` and named in the reply.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from mllm.errors import InputError
from mllm.files import atomic_write
from mllm.generation import GenerationConfig, TokenSampling
from mllm.media import Audio, Image, MediaError, Video, load_media, save_audio, save_image, save_video
from mllm.pipeline import Item, Media, Pipeline
from mllm.processor import MessageError, SequenceTooLongError

SUFFIXES = {
    "image": {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"},
    "audio": {".wav", ".flac", ".ogg", ".mp3"},
    "video": {".mp4", ".webm", ".mov", ".mkv", ".avi"},
}
SAVERS: dict[type, tuple[str, str, Callable]] = {
    Image: ("image", ".png", save_image), Audio: ("audio", ".wav", save_audio), Video: ("video", ".mp4", save_video),
}
REPLIES = ("text", *SUFFIXES, "transcript")
HELP = """commands:
  /attach PATH...     attach images, audio or video to your next message
  /set KEY=VALUE...   temperature, top_k, top_p, repetition_penalty, max_tokens, seed,
                      reply (text|image|audio|video|transcript: write down the one attached recording)
  /reset              start a new conversation
  /save PATH          write the transcript as JSON (media as file paths)
  /help, /quit"""


class ChatError(InputError, ValueError):
    """A bad command, attachment or setting: reported, and the chat goes on."""


def modality_of(path: Path) -> str:
    for modality, suffixes in SUFFIXES.items():
        if path.suffix.lower() in suffixes:
            return modality
    raise ChatError(f"{path}: unknown media type {path.suffix!r} (images: {sorted(SUFFIXES['image'])}, "
                    f"audio: {sorted(SUFFIXES['audio'])}, video: {sorted(SUFFIXES['video'])})")


@dataclass
class Settings:
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    reply: str = "text"  # a medium the reply opens with, or "transcript" (Pipeline.transcribe)

    def set(self, key: str, value: str) -> None:
        if key not in self.__dataclass_fields__:
            raise ChatError(f"unknown setting {key!r} (settings: {', '.join(self.__dataclass_fields__)})")
        if key == "reply" and value not in REPLIES:
            raise ChatError(f"reply: expected one of {', '.join(REPLIES)}, got {value!r}")
        try:
            parsed: Any = value if key == "reply" else int(value) if key in ("max_tokens", "top_k", "seed") else float(value)
        except ValueError as e:
            raise ChatError(f"{key}: expected a number, got {value!r}") from e
        candidate = replace(self, **{key: parsed})
        try:
            candidate.config()
        except ValueError as e:
            raise ChatError(f"{key}={value}: {e}") from e
        setattr(self, key, parsed)

    def config(self) -> GenerationConfig:
        sampling = TokenSampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                 repetition_penalty=self.repetition_penalty)
        return GenerationConfig(max_new_tokens=self.max_tokens, text=sampling, codes=sampling, seed=self.seed)


@dataclass
class ChatSession:
    pipeline: Pipeline
    media_dir: Path
    out: TextIO = field(default_factory=lambda: sys.stdout)  # looked up per session: tests and callers swap it
    settings: Settings = field(default_factory=Settings)
    messages: list[dict] = field(default_factory=list)  # the conversation, media as loaded objects
    transcript: list[dict] = field(default_factory=list)  # the same, media as file paths
    pending: list[tuple[Path, dict]] = field(default_factory=list)  # attachments for the next message
    saved: int = 0
    intro: str | None = None  # shown under the commands by /help: what to ask this model

    def help(self) -> None:
        self.out.write(HELP + "\n" + (f"\n{self.intro}\n\n" if self.intro else ""))

    def attach(self, path: Path) -> None:
        modality = modality_of(path)
        if modality not in self.pipeline.processor.media_tokenizers:
            raise ChatError(f"{path}: this model does not read {modality}")
        try:
            media = load_media(path, modality, **self.pipeline.processor.load_options(modality))
        except MediaError as e:
            raise ChatError(str(e)) from e
        self.pending.append((path, {"type": modality, "media": media}))

    def reset(self) -> None:
        self.messages.clear()
        self.transcript.clear()
        self.pending.clear()

    def save_transcript(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.transcript, indent=2)
        atomic_write(path, lambda tmp: tmp.write_text(text))  # a kill mid-write keeps the last one whole
        return path

    def ask(self, text: str) -> list[dict]:
        """Send one user turn, stream the reply to `out`; returns the reply's transcript parts."""
        force = None if self.settings.reply in ("text", "transcript") else self.settings.reply
        if self.settings.reply == "transcript" and len(self.pending) != 1:
            raise ChatError(f"reply=transcript writes down one attached recording; this message has {len(self.pending)} "
                            "attachments (/attach one, or /set reply=text)")
        if force is not None and force not in self.pipeline.detokenizers:
            raise ChatError(f"this model cannot write {force} (it writes text and {sorted(self.pipeline.detokenizers)})")
        parts = [part for _, part in self.pending] + ([{"type": "text", "text": text}] if text else [])
        if not parts:
            raise ChatError("nothing to send")
        user = {"role": "user", "content": parts}
        paths = [{"type": part["type"], "path": str(path)} for path, part in self.pending]
        self.out.write("mllm> ")
        self.out.flush()

        def on_text(row: int, delta: str) -> None:
            self.out.write(delta)
            self.out.flush()

        conversation = [*self.messages, user]
        try:
            if self.settings.reply == "transcript":  # joint CTC/attention decoding picks the reply whole: no stream
                reply: list[Item] = self.pipeline.transcribe([conversation], max_new_tokens=self.settings.max_tokens)
                on_text(0, reply[0])
            else:
                [reply] = self.pipeline.chat([conversation], self.settings.config(), force=force, on_text=on_text)
        except (MessageError, SequenceTooLongError, MediaError, KeyError) as e:
            self.out.write("\n")
            raise ChatError(str(e)) from e
        content, named = [], []
        for item in reply:
            if isinstance(item, str):
                content.append({"type": "text", "text": item})
                named.append({"type": "text", "text": item})
            else:
                path = self._save(item)
                content.append({"type": SAVERS[type(item)][0], "media": item})
                named.append({"type": SAVERS[type(item)][0], "path": str(path)})
                self.out.write(f" [{SAVERS[type(item)][0]}: {path}] ")
        self.out.write("\n")
        self.messages += [user, {"role": "assistant", "content": content}]
        self.transcript += [{"role": "user", "content": paths + parts[len(paths):]}, {"role": "assistant", "content": named}]
        self.pending.clear()
        return named

    def _save(self, media: Media) -> Path:
        """Write a generated medium to media_dir under a name no file has, there from an earlier chat or not."""
        modality, suffix, save = SAVERS[type(media)]
        self.media_dir.mkdir(parents=True, exist_ok=True)
        while True:
            self.saved += 1
            path = self.media_dir / f"reply-{self.saved:03d}-{modality}{suffix}"
            try:  # O_EXCL claims the name, even against a chat running beside this one
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            try:
                return save(media, path)  # replaces the empty claim in one step
            except BaseException:
                path.unlink()  # no empty file left behind
                raise

    def command(self, line: str) -> bool:
        """Run one /command; False for /quit."""
        try:
            name, *args = shlex.split(line)
        except ValueError as e:  # e.g. an unbalanced quote
            raise ChatError(f"{line!r}: {e}") from e
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.help()
        elif name == "/reset":
            self.reset()
            self.out.write("(new conversation)\n")
        elif name == "/attach":
            if not args:
                raise ChatError("/attach needs at least one path")
            for arg in args:
                self.attach(Path(arg))
            self.out.write(f"(attached: {', '.join(str(p) for p, _ in self.pending)})\n")
        elif name == "/save":
            if len(args) != 1:
                raise ChatError("/save needs one path")
            self.out.write(f"(transcript saved: {self.save_transcript(Path(args[0]))})\n")
        elif name == "/set":
            if not args:
                self.out.write(" ".join(f"{k}={v}" for k, v in vars(self.settings).items()) + "\n")
            for arg in args:
                key, eq, value = arg.partition("=")
                if not eq:
                    raise ChatError(f"/set expects KEY=VALUE, got {arg!r}")
                self.settings.set(key, value)
                self.out.write(f"({key}={getattr(self.settings, key)})\n")
        else:
            raise ChatError(f"unknown command {name} (try /help)")
        return True


def repl(session: ChatSession, read: Callable[[str], str] = input) -> int:
    session.help()
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            session.out.write("\n")
            return 0
        try:
            if line.startswith("/"):
                if not session.command(line):
                    return 0
            elif line or session.pending:
                session.ask(line)
        except ChatError as e:
            session.out.write(f"error: {e}\n")
        except KeyboardInterrupt:  # Ctrl-C during a reply (or a slow /attach) cancels it, not the chat
            session.out.write("\n(cancelled)\n")


def run_chat(model: Path, *, messages: list[str], attach: list[Path], media_dir: Path, settings: Settings,
             transcript: Path | None = None, device: str | None = None, intro: str | None = None) -> int:
    """Chat with `model`: the turns in `messages`, or a terminal REPL whose /help also shows `intro`."""
    session = ChatSession(Pipeline.from_pretrained(model, device=device), media_dir, settings=settings, intro=intro)
    try:
        for path in attach:
            session.attach(path)
        if not messages:
            code = repl(session)
        else:
            for text in messages:
                session.ask(text)
            code = 0
    except ChatError as e:
        print(f"mllm chat: {e}", file=sys.stderr)
        code = 2
    finally:  # also on Ctrl-C or a crash: the turns so far are kept
        if transcript is not None:
            session.save_transcript(transcript)
    return code
