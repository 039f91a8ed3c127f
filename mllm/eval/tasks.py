"""What an evaluation is made of: items, predictions, scores, tasks, and the task registry.

A `Task` is a list of `Item`s read by a loader from a benchmark's native files,
how the model answers them (`mode`), and the benchmark's scorer:

    task = build_task(load_task_spec("eval/tasks/mme.yaml"))
    task.items[0].messages()                        # the user turn the model sees
    task.score(task.items, predictions)             # -> Scores: metrics, per item, per category

Task specs are YAML files (`eval/tasks/*.yaml`) naming a loader, a local path and
the loader's options; `load_task_spec` validates one against `TaskSpec` and the
loader's own options dataclass. `${MLLM_BENCHMARKS}` in a path is that variable,
or ~/benchmarks when it is unset. `list_tasks()` names the shipped specs and the
built-in proxies (mllm.eval.proxies).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mllm.config import ConfigError, from_dict, load_config
from mllm.media import MediaError, Video, load_image, load_video

if TYPE_CHECKING:  # mllm.data.records imports `datasets`, which a task spec should not need
    from mllm.data.records import BadRecords

Modality = Literal["image", "audio", "video"]
Mode = Literal["generate", "transcribe", "likelihood", "both", "media"]
ROOT = Path(__file__).resolve().parents[2]
SPEC_DIR = ROOT / "eval" / "tasks"  # the shipped task specs
BENCHMARKS_ENV, DEFAULT_BENCHMARKS = "MLLM_BENCHMARKS", "~/benchmarks"  # where the shipped specs look for downloads
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class MediaRef:
    """One input medium of an item: a file, or a folder of frames (a video); a video may be cut to a segment."""

    type: Modality
    path: str  # absolute
    segment: tuple[float, float] | None = None  # (start, end) in seconds, videos only

    def part(self) -> dict:
        """The message content part the processor reads."""
        if self.type != "video" or (self.segment is None and Path(self.path).is_file()):
            return {"type": self.type, "path": self.path}
        return {"type": "video", "media": self.load_video()}

    def load_video(self) -> Video:
        """The video, from a file or a folder of frame images (at 1 fps), cut to `segment` if given."""
        path = Path(self.path)
        span = self.segment
        if span is not None and not (all(map(math.isfinite, span)) and 0 <= span[0] <= span[1]):
            raise MediaError(str(path), f"segment {self.segment} s is no span of a video: need 0 <= start <= end")
        if path.is_dir():
            frames = sorted((p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural)
            if not frames:
                raise MediaError(str(path), "a frame folder with no images")
            images = [load_image(p) for p in frames]
            size = (images[0].height, images[0].width)
            video = Video(np.stack([im.resize(size).pixels for im in images]), fps=1.0)
        else:
            video = load_video(path)
        if self.segment is None:
            return video
        first = int(self.segment[0] * video.fps)
        frames = video.frames[first:max(first + 1, int(self.segment[1] * video.fps) + 1)]
        if len(frames) == 0:
            raise MediaError(str(path), f"segment {self.segment} s is past the video's end ({video.duration:.1f} s)")
        return Video(frames, fps=video.fps)


def _natural(path: Path) -> list:
    """Sort key putting 2.png before 10.png."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


@dataclass
class Item:
    """One question (or generation prompt) with its reference answer."""

    id: str
    question: str  # the user's text
    answer: Any  # str; or list[str] (VQA's ten answers, captions' references); a generation's target
    media: list[MediaRef] = field(default_factory=list)
    choices: list[str] | None = None  # multiple choice: the options, in order (answer: the right one's letter)
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # what the scorer needs besides the answer

    def messages(self) -> list[dict]:
        """The user turn: media first, then the question."""
        return [{"role": "user", "content": [m.part() for m in self.media] + [{"type": "text", "text": self.question}]}]


@dataclass
class Prediction:
    """What the model produced for one item."""

    id: str
    text: str | None = None  # the generated answer
    choice: int | None = None  # likelihood: the index of the most likely option
    choice_logprobs: list[float] | None = None
    files: list[str] = field(default_factory=list)  # generated media, relative to the output directory

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != []}

    @classmethod
    def from_dict(cls, data: dict) -> Prediction:
        return cls(**{k: data[k] for k in ("id", "text", "choice", "choice_logprobs", "files") if k in data})


@dataclass
class Scores:
    metrics: dict[str, Any]  # e.g. {"accuracy": 0.93, "n": 200}; a skipped metric is a "skipped: ..." string
    per_item: dict[str, float]  # item id -> its score in [0, 1] (1: right)
    categories: dict[str, dict[str, Any]] = field(default_factory=dict)  # category -> its metrics
    judged: dict[str, str] = field(default_factory=dict)  # item id -> what a judge read in its generated file


Scorer = Callable[[Sequence[Item], Sequence[Prediction]], Scores]


@dataclass
class Task:
    name: str
    items: list[Item]
    score: Scorer
    mode: Mode = "generate"  # both: generated answers and the likelihood of each option; transcribe: answers
    # that say what the item's medium says (the predictor may also read the medium's slots: `transcribe`)
    max_new_tokens: int = 32
    modality: Modality | None = None  # mode "media": what to generate
    proxy: bool = False  # built from the built-in corpora, not the real benchmark
    source: str = ""  # the files it was read from
    skipped: list[str] = field(default_factory=list)  # bad items left out, "file:line: reason: detail"

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        if self.mode in ("likelihood", "both") and any(not item.choices for item in self.items):
            raise ValueError(f"{self.name}: mode {self.mode!r} needs options on every item")
        if (self.mode == "media") != (self.modality is not None):
            raise ValueError(f"{self.name}: mode 'media' and a modality to generate go together")


# ---- task specs ---------------------------------------------------------------------------------------------


@dataclass
class TaskSpec:
    """A benchmark on local disk: which loader reads it, where it is, and how to run it."""

    loader: str  # one of mllm.eval.loaders.LOADERS
    path: str  # file or folder; ~ and $VARS expand; relative to the spec's folder
    name: str | None = None  # default: the spec file's name
    options: dict[str, Any] = field(default_factory=dict)  # the loader's options (see its Options dataclass)
    mode: Mode | None = None  # default: the loader's
    max_new_tokens: int | None = None  # default: the loader's
    proxy: bool = False

    def __post_init__(self):
        from mllm.eval.loaders import LOADERS

        if self.loader not in LOADERS:
            raise ValueError(f"unknown loader {self.loader!r} (known: {', '.join(sorted(LOADERS))})")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        from_dict(LOADERS[self.loader].options, self.options, _key="options")  # unknown or mistyped options fail here


def load_task_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> TaskSpec:
    """Read and validate a task spec YAML; a relative `path` in it is taken from the spec's folder."""
    path = Path(path)
    spec = load_config(TaskSpec, path, overrides)
    spec.name = spec.name or path.stem
    benchmarks = os.environ.get(BENCHMARKS_ENV) or os.path.expanduser(DEFAULT_BENCHMARKS)
    expanded = os.path.expanduser(os.path.expandvars(spec.path.replace(f"${{{BENCHMARKS_ENV}}}", benchmarks)))
    if "$" in expanded:
        raise ConfigError("path", f"{spec.path!r} names an environment variable that is not set", str(path))
    spec.path = str((path.parent / expanded).resolve()) if not os.path.isabs(expanded) else expanded
    return spec


def shipped_specs() -> dict[str, Path]:
    """Name -> spec file of the task specs in eval/tasks/."""
    return {p.stem: p for p in sorted(SPEC_DIR.glob("*.yaml"))}


def list_tasks() -> list[str]:
    """Every task name `resolve_tasks` knows: the shipped specs and the built-in proxies."""
    from mllm.eval.proxies import PROXIES

    return sorted(set(shipped_specs()) | set(PROXIES))


def build_task(spec: TaskSpec, policy: Literal["fail", "skip"] = "fail") -> Task:
    """Read the benchmark a spec names, with its loader; bad items fail or are skipped by `policy`."""
    from mllm.data.records import BadRecords
    from mllm.eval.loaders import LOADERS

    loader = LOADERS[spec.loader]
    if not os.path.exists(spec.path):
        raise FileNotFoundError(f"{spec.name}: no such file or folder {spec.path} (the {spec.loader} download goes there)")
    options = from_dict(loader.options, spec.options, _key="options")
    bad = BadRecords(policy)
    task = loader.load(spec.name or spec.loader, Path(spec.path), options, bad)
    task.items = _first_of_each_id(task, bad)
    if spec.mode is not None:
        task.mode = spec.mode
    if spec.max_new_tokens is not None:
        task.max_new_tokens = spec.max_new_tokens
    task.proxy = task.proxy or spec.proxy
    task.skipped = [str(e) for e in bad.skipped]
    task.check()
    return task


def _first_of_each_id(task: Task, bad: BadRecords) -> list[Item]:
    """The task's items, each id once: predictions and scores are keyed by id, so a later item with a seen id
    would be scored by the earlier one's answer. It is a bad item."""
    from mllm.data.records import BadRecordError

    seen: set[str] = set()
    kept = []
    for item in task.items:
        if item.id in seen:
            bad(BadRecordError("duplicate_id", f"{task.name}:{item.id}", "an earlier item has this id"))
        else:
            seen.add(item.id)
            kept.append(item)
    return kept
