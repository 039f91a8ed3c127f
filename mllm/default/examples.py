"""What to ask the embedded default model: one request of each kind it was trained on, in its corpora's words.

It is a 2M-parameter model trained on a few phrasings per task, not a general assistant. It answers these kinds
of request, best phrased as they are here; a request of another kind ("What is 2 plus 3?") gets one of these
kinds of reply, whatever it asked. `mllm chat` shows them when it loads the embedded default model, with a test
file of the built corpora to attach where a request reads a medium; the README lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mllm.data.corpora import digits, first_test_record, speech, video


@dataclass(frozen=True)
class Example:
    request: str
    reply: str  # what comes back, in words
    replies: tuple[str, ...]  # the kinds of part the reply holds, in order: text, image, audio, video
    attach: str | None = None  # what to attach first, in words; None: the request alone
    test_file: tuple[str, str] | None = None  # (corpus, task): a test record of it holds such a medium
    test_meta: tuple[tuple[str, str], ...] = ()  # (key, value) pairs of that record's meta: the medium `attach` names

    def to_dict(self) -> dict[str, str | None]:
        """What the web page shows: the request, what to attach first, what comes back."""
        return {"request": self.request, "attach": self.attach, "reply": self.reply}


EXAMPLES = (
    Example(digits.GEN_PROMPTS[0].format(d=7, w="seven"), "a handwritten 7", ("image",)),
    Example(speech.TTS_PROMPTS[0].format(t="three six zero"), "the words spoken", ("audio",)),
    Example(video.GEN_PROMPTS[0].format(what="the digit 4", d="left"), "a clip of a 4 moving left", ("video",)),
    Example("Show me a 3, then say it.", "a handwritten 3, then the word spoken", ("image", "audio")),
    Example(digits.QA_QUESTIONS[0], "the digit", ("text",), "a digit image", ("digits", "image_qa")),
    Example(speech.ASR_PROMPTS[0], "the words", ("text",), "a recording of numbers", ("speech", "asr"),
            (("kind", "digits"),)),
    Example(speech.NUMBER_PROMPTS[0], "the number, in digits", ("text",), "a recording of numbers", ("speech", "asr"),
            (("kind", "digits"),)),
    Example(video.DIGITS_QUESTION, "the digits", ("text",), "a clip of moving digits", ("video", "video_qa")),
)


def example_medium(corpora: Path, example: Example) -> Path | None:
    """The medium of the first test record of the example's (corpus, task) and `test_meta` in the built `corpora`;
    None when the example reads none, or the corpora are not built."""
    if example.test_file is None:
        return None
    corpus, task = example.test_file
    try:
        record = first_test_record(corpora, corpus, task,
                                   lambda r: all(r["meta"].get(key) == value for key, value in example.test_meta))
    except (OSError, ValueError, LookupError):
        return None
    return next((corpora / corpus / p["path"] for p in record["messages"][0]["content"] if p["type"] != "text"), None)


def describe_examples(corpora: Path) -> str:
    """The examples as `mllm chat` shows them: a request, what comes back, and what to attach first."""
    lines = ["The embedded default model is tiny: it answers the kinds of request it was trained on, best in these",
             "words and each in a new conversation (/reset); another kind of request gets one of these kinds of reply:"]
    for example in EXAMPLES:
        if example.attach is not None:
            medium = example_medium(corpora, example)
            lines.append(f"  /attach {medium or f'<{example.attach}: `mllm data build` makes test files>'}")
        lines.append(f"  {example.request:<42} -> {example.reply}")
    return "\n".join(lines)
