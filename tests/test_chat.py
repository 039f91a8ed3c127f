"""`mllm chat`: scripted with --message/--attach, and interactive through a pty."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mllm import chat
from mllm.chat import ChatSession, Settings, repl
from mllm.cli import main
from mllm.media import Image, load_image
from tests.test_serve import image_checkpoint, png_bytes  # noqa: F401  (the fixture, used by name)


@pytest.fixture
def cat(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes())
    return path


def test_scripted_turns_stream_text_and_save_generated_media(image_checkpoint, cat, tmp_path, capsys):
    code = main(["chat", "--model", str(image_checkpoint), "--attach", str(cat), "--message", "Draw this again.",
                 "--message", "And once more.", "--reply", "image", "--max-tokens", "8", "--seed", "0",
                 "--media-dir", str(tmp_path / "media"), "--transcript", str(tmp_path / "chat.json")])
    out = capsys.readouterr().out
    assert code == 0 and out.count("mllm> ") == 2
    saved = sorted((tmp_path / "media").iterdir())
    assert [p.name for p in saved] == ["reply-001-image.png", "reply-002-image.png"]
    for path in saved:
        assert f"[image: {path}]" in out and load_image(path).pixels.shape == (8, 8, 3)
    transcript = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in transcript] == ["user", "assistant", "user", "assistant"]
    assert transcript[0]["content"] == [{"type": "image", "path": str(cat)}, {"type": "text", "text": "Draw this again."}]
    assert {"type": "image", "path": str(saved[0])} in transcript[1]["content"]


def test_bad_attachment_is_a_clean_error(image_checkpoint, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("hi")
    assert main(["chat", "--model", str(image_checkpoint), "--attach", str(notes), "--message", "Hi."]) == 2
    assert "unknown media type '.txt'" in capsys.readouterr().err


def test_interactive_repl_through_a_pty(image_checkpoint, cat, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "mllm.cli", "chat", "--model", str(image_checkpoint), "--max-tokens", "6",
                                           "--media-dir", str(tmp_path / "media")], encoding="utf-8", timeout=90)
    try:
        child.expect("you> ")
        child.sendline("/set temperature=0.7 seed=1 reply=image")
        child.expect(r"\(reply=image\)")
        child.sendline("/set top_p=7")
        child.expect("error: top_p=7: ")
        child.sendline(f"/attach {cat}")
        child.expect(r"\(attached: .*cat.png\)")
        child.sendline("What is this?")
        child.expect(r"\[image: (\S+reply-001-image.png)\]")
        assert (tmp_path / "media" / "reply-001-image.png").is_file()
        child.expect("you> ")
        child.sendline(f"/save {tmp_path / 'chat.json'}")
        child.expect("transcript saved")
        child.sendline("/reset")
        child.expect(r"\(new conversation\)")
        child.sendline("/bogus")
        child.expect("unknown command /bogus")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    transcript = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in transcript] == ["user", "assistant"]


def test_unbalanced_quote_is_reported_and_the_chat_goes_on(tmp_path):
    session = ChatSession(pipeline=None, media_dir=tmp_path, out=io.StringIO())
    lines = iter(['/attach "my cat.png', "/set", "/quit"])
    assert repl(session, read=lambda prompt: next(lines)) == 0
    out = session.out.getvalue()
    assert "error: '/attach \"my cat.png': No closing quotation" in out and "max_tokens=256" in out


class ScriptedPipeline:
    """Stands in for a Pipeline: replies `reply`, or raises what `script` holds for that call."""

    processor, detokenizers = type("Processor", (), {"media_tokenizers": {}})(), {}

    def __init__(self, *script, reply=("hello",)):
        self.script, self.reply = list(script), list(reply)

    def chat(self, conversations, config, force=None, on_text=None):
        step = self.script.pop(0) if self.script else None
        if step is not None:
            raise step
        for item in self.reply:
            if isinstance(item, str):
                on_text(0, item)
        return [list(self.reply)]


def test_ctrl_c_cancels_one_reply_and_the_chat_goes_on(tmp_path):
    session = ChatSession(ScriptedPipeline(KeyboardInterrupt()), tmp_path, out=io.StringIO())
    lines = iter(["a long question", "again", "/quit"])
    assert repl(session, read=lambda prompt: next(lines)) == 0
    assert "(cancelled)" in session.out.getvalue() and session.out.getvalue().count("hello") == 1
    assert [m["content"][0]["text"] for m in session.messages] == ["again", "hello"]


def test_transcript_is_saved_on_ctrl_c_or_a_crash(tmp_path, monkeypatch):
    for failure in (KeyboardInterrupt(), RuntimeError("bug")):
        pipeline = ScriptedPipeline(None, failure)
        monkeypatch.setattr(chat.Pipeline, "from_pretrained", lambda path, device=None, p=pipeline: p)
        transcript = tmp_path / f"{type(failure).__name__}.json"
        with pytest.raises(type(failure)):
            chat.run_chat(tmp_path, messages=["one", "two"], attach=[], media_dir=tmp_path, settings=Settings(),
                          transcript=transcript)
        assert [m["role"] for m in json.loads(transcript.read_text())] == ["user", "assistant"]


def test_a_new_chat_never_overwrites_media_an_earlier_one_saved(tmp_path):
    for value in (10, 200):  # two chats, one after the other, in the same --media-dir
        pipeline = ScriptedPipeline(reply=[Image(np.full((4, 4, 3), value, np.uint8))])
        ChatSession(pipeline, tmp_path, out=io.StringIO()).ask("Draw.")
    saved = sorted(tmp_path.iterdir())
    assert [p.name for p in saved] == ["reply-001-image.png", "reply-002-image.png"]
    assert [load_image(p).pixels[0, 0, 0] for p in saved] == [10, 200]


def test_an_attached_video_is_loaded_as_the_models_tokenizer_reads_it(tmp_path):
    from types import SimpleNamespace

    from mllm.media import Video, save_video

    class Reader:  # a processor whose video tokenizer samples 3 frames
        media_tokenizers = {"video": None}

        @staticmethod
        def load_options(modality):
            return {"even_frames": 3}

    clip = save_video(Video(np.zeros((12, 16, 16, 3), np.uint8), fps=6), tmp_path / "clip.mp4")
    session = ChatSession(SimpleNamespace(processor=Reader()), tmp_path)
    session.attach(clip)
    assert session.pending[0][1]["media"].num_frames == 3


def test_a_transcript_save_that_fails_keeps_the_last_one_whole(tmp_path, monkeypatch):
    from types import SimpleNamespace

    session = ChatSession(SimpleNamespace(processor=None), tmp_path)
    session.transcript.append({"role": "user", "content": "one"})
    path = session.save_transcript(tmp_path / "t.json")
    before = path.read_bytes()
    session.transcript.append({"role": "user", "content": "two"})

    def half(self, data, *args, **kwargs):  # the write dies halfway
        open(self, "w").write(data[:5])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(KeyboardInterrupt):
        session.save_transcript(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["t.json"]
