"""Build every built-in corpus into one directory, deterministically.

    from mllm.data.corpora.build import build_corpora
    manifest = build_corpora("data/build.yaml", "data/corpora")

The build writes into `OUT.tmp-<pid>` next to `OUT`, writes `manifest.json`
last, then renames the directory to `OUT`. A directory without a manifest is
an unfinished (killed) build. An existing complete `OUT` is only replaced with
`overwrite=True`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mllm.config import ConfigError, from_dict, load_config, to_dict
from mllm.data.corpora import SPLITS, BuildContext, CorpusResult, get_corpus, list_corpora
from mllm.errors import InputError
from mllm.files import atomic_write_text, process_gone
from mllm.registry import UnknownNameError

MANIFEST = "manifest.json"
FORMAT_VERSION = 4  # 2: the interleaved corpus has read_then_draw conversations; 3: spoken questions carry their
# transcript; 4: the defaults speak a quarter of 8,000 train utterances in Flite voices (a build from before the
# Flite settings existed would otherwise read as one with them)


# ---------------------------------------------------------------- config


@dataclass
class Fractions:
    """Split proportions; they must add up to 1."""

    train: float = 0.8
    validation: float = 0.1
    test: float = 0.1

    def __post_init__(self):
        values = [self.train, self.validation, self.test]
        if any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and add up to 1, got {values}")


@dataclass
class Counts:
    """A number per split."""

    train: int = 0
    validation: int = 0
    test: int = 0

    def __post_init__(self):
        if min(self.train, self.validation, self.test) < 0:
            raise ValueError("counts must be >= 0")

    def get(self, split: str) -> int:
        return int(getattr(self, split))


def _check_at_least(cfg, low: float, *names: str) -> None:
    """Refuse a setting of `cfg` below `low` by name (None, where allowed, means all and passes)."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ValueError(f"{name} {value} must be at least {low:g}")


def _check_ranges(cfg, *names: str) -> None:
    """Refuse a (low, high) setting of `cfg` whose low end is above its high end, by name."""
    for name in names:
        low, high = getattr(cfg, name)
        if low > high:
            raise ValueError(f"{name} {list(getattr(cfg, name))}: the low end is above the high end")


def _check_choices(n: int) -> None:
    if not 2 <= n <= 26:  # answered with a letter, A to Z
        raise ValueError(f"num_choices {n} must be between 2 and 26")


@dataclass
class VoicesConfig:
    """espeak-ng voices: an accent (`en-us`) plus a variant (`m3`) give `en-us+m3`.

    Test utterances use only voices with a held-out accent or a held-out variant;
    train and validation never use either.
    """

    accents: list[str] = field(default_factory=lambda: [
        "en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-us-nyc",
        "en-029", "en-gb-x-gbcwmd",
    ])
    variants: list[str] = field(default_factory=lambda: [
        "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
        "klatt", "klatt2", "klatt3", "adam", "Alex", "Andy", "aunty", "boris", "david",
        "edward", "grandma", "grandpa", "john", "linda", "max", "paul", "rob", "steph",
    ])
    held_out_accents: list[str] = field(default_factory=lambda: ["en-029", "en-gb-x-gbcwmd"])
    held_out_variants: list[str] = field(default_factory=lambda: ["m7", "f4", "klatt3", "grandma", "steph"])
    # Learners' accents, for train and validation only: another language's voice (`fr-fr`) says the English
    # phonemes of `learner_phonemes` with its own sounds for them, as someone who learnt English would. They
    # widen what the training accents span; the test's voices stay the native held-out ones.
    learner_accents: list[str] = field(default_factory=list)
    learner_phonemes: str = "en-us"
    # Flite voices (`flite -lv`: kal, kal16, awb, rms, slt), for train and validation only: a second synthesizer,
    # built from recordings of real speakers, so that the ear does not take espeak-ng's formant sound for speech
    # itself. `flite_share` of those splits' utterances take one; the test's voices stay espeak-ng's held-out ones.
    flite_voices: list[str] = field(default_factory=lambda: ["kal16", "awb", "rms", "slt"])
    flite_share: float = 0.25
    rate: tuple[int, int] = (130, 210)  # words per minute
    pitch: tuple[int, int] = (25, 75)  # espeak 0..99
    word_gap: tuple[int, int] = (0, 4)  # pause between words, in 10 ms units
    gain: tuple[float, float] = (0.3, 0.95)  # peak level after normalisation
    noise_prob: float = 0.3  # share of utterances with added white noise
    snr_db: tuple[float, float] = (15.0, 40.0)

    def __post_init__(self):
        for name in ("held_out_accents", "held_out_variants"):
            pool = self.accents if name == "held_out_accents" else self.variants
            bad = [v for v in getattr(self, name) if v not in pool]
            if bad:
                raise ValueError(f"{name} {bad} are not in the {name.split('_')[-1]} list")
        if not set(self.accents) - set(self.held_out_accents):
            raise ValueError("every accent is held out: nothing is left for train")
        if not set(self.variants) - set(self.held_out_variants):
            raise ValueError("every variant is held out: nothing is left for train")
        if not (self.held_out_accents or self.held_out_variants):
            raise ValueError("hold out at least one accent or variant for the test split")
        if set(self.learner_accents) & set(self.accents):
            raise ValueError(f"learner_accents {sorted(set(self.learner_accents) & set(self.accents))} are also in "
                             "accents: a learner's accent reads English phonemes, a native one English text")
        if not 0.0 <= self.flite_share <= 1.0:
            raise ValueError(f"flite_share {self.flite_share} is not a share between 0 and 1")
        if self.flite_share and not self.flite_voices:
            raise ValueError(f"flite_share {self.flite_share} needs flite_voices to draw from")
        if self.learner_accents and (self.learner_phonemes not in self.accents
                                     or self.learner_phonemes in self.held_out_accents):
            raise ValueError(f"learner_phonemes {self.learner_phonemes!r} must be one of the accents that train "
                             "uses: a held-out accent's phonemes would leak it into training")
        _check_ranges(self, "rate", "pitch", "word_gap", "gain", "snr_db")
        if self.rate[0] < 1:
            raise ValueError(f"rate {list(self.rate)}: a rate is at least 1 word per minute")
        if not 0.0 <= self.noise_prob <= 1.0:
            raise ValueError(f"noise_prob {self.noise_prob} is not a share between 0 and 1")


@dataclass
class DigitsConfig:
    enabled: bool = True
    fractions: Fractions = field(default_factory=Fractions)  # cut along the package's own order
    per_class: Counts | None = None  # cap on images per class and split (None: all)
    image_size: int = 32
    tasks: list[Literal["image_qa", "image_caption", "image_generation"]] = field(
        default_factory=lambda: ["image_qa", "image_caption", "image_generation"])

    def __post_init__(self):
        _check_at_least(self, 1, "image_size")


@dataclass
class StampsConfig:
    enabled: bool = True
    fractions: Fractions = field(default_factory=Fractions)  # over caption groups
    max_stamps: int | None = None
    image_size: int = 64
    num_choices: int = 4
    train_variants: int = 3  # renders per train stamp (the first is plain, others jittered)
    tasks: list[Literal["image_caption", "image_qa", "image_mcq", "image_generation"]] = field(
        default_factory=lambda: ["image_caption", "image_qa", "image_mcq", "image_generation"])

    def __post_init__(self):
        _check_at_least(self, 1, "max_stamps", "image_size", "train_variants")
        _check_choices(self.num_choices)


@dataclass
class SpeechMix:
    """Share of each kind of utterance."""

    digits: float = 0.4
    words: float = 0.25
    sentences: float = 0.2
    questions: float = 0.15

    def __post_init__(self):
        _check_at_least(self, 0, "digits", "words", "sentences", "questions")
        if not self.digits + self.words + self.sentences + self.questions > 0:
            raise ValueError("every share is 0: nothing to say")


@dataclass
class SpeechConfig:
    enabled: bool = True
    utterances: Counts = field(default_factory=lambda: Counts(8000, 300, 600))
    mix: SpeechMix = field(default_factory=SpeechMix)
    max_digits: int = 4
    text_fractions: Fractions = field(default_factory=Fractions)  # texts held out of train
    workers: int = 2
    tasks: list[Literal["asr", "speech_qa", "tts"]] = field(default_factory=lambda: ["asr", "speech_qa", "tts"])

    def __post_init__(self):
        _check_at_least(self, 1, "max_digits")


@dataclass
class SoundsConfig:
    enabled: bool = True
    fractions: Fractions = field(default_factory=Fractions)
    max_sounds: int | None = None
    max_seconds: float = 5.0
    num_choices: int = 4
    tasks: list[Literal["sound_caption", "sound_qa", "sound_generation"]] = field(
        default_factory=lambda: ["sound_caption", "sound_qa", "sound_generation"])
    spoken_numbers: bool = True  # the eval-only corpus `spoken_numbers` (test split only)

    def __post_init__(self):
        _check_at_least(self, 1, "max_sounds")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds {self.max_seconds} must be above 0")
        _check_choices(self.num_choices)


@dataclass
class VideoConfig:
    enabled: bool = True
    clips: Counts = field(default_factory=lambda: Counts(4000, 200, 400))
    frames: int = 8
    size: int = 32
    fps: float = 4.0
    digit_size: int = 16
    max_digits: int = 2
    # video_lane_qa: one question per lane of a clip of several digits ("Which digit is on the top?")
    tasks: list[Literal["video_qa", "video_lane_qa", "video_caption", "video_generation"]] = field(
        default_factory=lambda: ["video_qa", "video_caption", "video_generation"])

    def __post_init__(self):
        _check_at_least(self, 1, "frames", "size", "digit_size", "max_digits")
        if self.digit_size > self.size:
            raise ValueError(f"digit_size {self.digit_size} does not fit in a frame of size {self.size}")
        if self.max_digits > 10:  # a clip's digits are distinct
            raise ValueError(f"max_digits {self.max_digits}: a clip shows distinct digits, at most 10")
        if not self.fps > 0:
            raise ValueError(f"fps {self.fps} must be above 0")


@dataclass
class InterleavedConfig:
    enabled: bool = True
    samples: Counts = field(default_factory=lambda: Counts(2000, 140, 280))


@dataclass
class TextConfig:
    enabled: bool = True
    source: Literal["wordnet"] = "wordnet"
    fractions: Fractions = field(default_factory=lambda: Fractions(0.98, 0.01, 0.01))
    max_glosses: int | None = None
    corpus_text: bool = True  # add the captions, questions and answers of the other corpora

    def __post_init__(self):
        _check_at_least(self, 1, "max_glosses")


@dataclass
class BuildConfig:
    seed: int = 0
    sample_rate: int = 16000
    voices: VoicesConfig = field(default_factory=VoicesConfig)
    digits: DigitsConfig = field(default_factory=DigitsConfig)
    stamps: StampsConfig = field(default_factory=StampsConfig)
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    sounds: SoundsConfig = field(default_factory=SoundsConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    interleaved: InterleavedConfig = field(default_factory=InterleavedConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self):
        _check_at_least(self, 1, "sample_rate")
        if self.interleaved.enabled and self.speech.max_digits < 2:
            raise ValueError(f"speech.max_digits {self.speech.max_digits}: the interleaved corpus asks for numbers "
                             "of 2 or more digits (disable it, or allow 2 digits)")
        for split in SPLITS:  # the clips and the interleaved samples show the digits of their own split
            wanted = [f"{name}.{counts} {split}" for name, counts in (("video", "clips"), ("interleaved", "samples"))
                      if getattr(self, name).enabled and getattr(getattr(self, name), counts).get(split)]
            if wanted and not getattr(self.digits.fractions, split):
                raise ValueError(f"{' and '.join(wanted)} need MNIST digits of that split, but "
                                 f"digits.fractions.{split} is 0")
            # its number_then_show samples say a number of 2+ digits held out to their split
            if self.interleaved.enabled and self.interleaved.samples.get(split) \
                    and not getattr(self.speech.text_fractions, split):
                raise ValueError(f"interleaved.samples {split} need numbers of that split, but "
                                 f"speech.text_fractions.{split} is 0")

    def enabled(self, corpus: str) -> bool:
        if corpus == "spoken_numbers":
            return self.sounds.enabled and self.sounds.spoken_numbers
        return bool(getattr(self, corpus).enabled)


def load_build_config(path: str | os.PathLike, overrides: list[str] | None = None) -> BuildConfig:
    """Read a build config YAML strictly: unknown keys raise `ConfigError` naming key and file."""
    return load_config(BuildConfig, path, overrides)


def stored_settings(cfg: BuildConfig) -> dict:
    """`cfg` as a manifest stores it: JSON types (lists, not tuples)."""
    return json.loads(json.dumps(to_dict(cfg)))


def built_settings(stored: object) -> dict | None:
    """A manifest's stored config as this mllm states it, None if it cannot read it. Settings added since the
    build was made take their defaults, and a new setting's default must build what the build before it did
    (else `FORMAT_VERSION` changes), so an older build of the same settings is still found to be this one."""
    try:
        return stored_settings(from_dict(BuildConfig, stored))
    except (ConfigError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------- manifest


class CorporaError(InputError):
    """The corpora a command reads are missing, unreadable or an older mllm's; the message says what to run."""


@dataclass
class Manifest:
    """`OUT/manifest.json`: seed, config, and per corpus its sources, licences and counts."""

    path: Path
    data: dict[str, Any]

    @property
    def corpora(self) -> dict[str, Any]:
        return self.data["corpora"]

    def counts(self, corpus: str) -> dict[str, int]:
        return self.data["corpora"][corpus]["counts"]

    @classmethod
    def load(cls, out: str | os.PathLike) -> "Manifest":
        path = Path(out) / MANIFEST
        rebuild = "rebuild the corpora with `mllm data build --overwrite`"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # not UTF-8, or not JSON
            raise CorporaError(f"{path} is not a readable manifest ({e}): {rebuild}") from None
        if not isinstance(data, dict):
            raise CorporaError(f"{path} is not a manifest (a JSON mapping), it holds a {type(data).__name__}: {rebuild}")
        return cls(path, data)


def is_complete(out: str | os.PathLike) -> bool:
    """True when `out` holds a finished build (its manifest was written last)."""
    return (Path(out) / MANIFEST).is_file()


def is_current(out: str | os.PathLike) -> bool:
    """True when `out` holds a finished build in the format this mllm writes."""
    return is_complete(out) and Manifest.load(out).data.get("format_version") == FORMAT_VERSION


def check_corpora(out: str | os.PathLike) -> None:
    """Raise CorporaError, naming what to run, unless `out` holds built corpora this mllm can use."""
    if not is_complete(out):
        raise CorporaError(f"no built corpora at {out}: run `mllm data build` first (see the README)")
    if not is_current(out):
        raise CorporaError(f"the corpora at {out} were built by an older mllm: rebuild them with "
                           "`mllm data build --overwrite`")


# ---------------------------------------------------------------- build


def build_corpora(
    config: BuildConfig | str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    limit: int | None = None,
    *,
    only: list[str] | None = None,
    progress: bool = True,
) -> Manifest:
    """Build the corpora of `config` (a `BuildConfig` or a YAML path) into directory `out`.

    - `overwrite`: replace an existing `out` (complete or not). Otherwise a complete build of the same
      settings (config, limit, corpora) is returned as it is, and anything else in `out` is refused.
    - `limit`: cap on source items per corpus and split (a quick look; counts shrink).
    - `only`: build just these corpora (names from `list_corpora()`).
    - `progress`: show a tqdm bar per corpus.

    Returns the `Manifest` (also at `out/manifest.json`).
    """
    cfg = config if isinstance(config, BuildConfig) else load_build_config(config)
    out = Path(out).absolute()
    names = list_corpora()
    if only is not None:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise UnknownNameError(f"unknown corpus {unknown[0]!r} (known: {', '.join(names)})")
        if disabled := [n for n in only if not cfg.enabled(n)]:
            switch = "sounds.enabled and sounds.spoken_numbers" if disabled[0] == "spoken_numbers" \
                else f"{disabled[0]}.enabled"
            raise ConfigError(switch, f"off in the config, so the {disabled[0]} corpus asked for is not built")
    selected = [n for n in names if cfg.enabled(n) and (only is None or n in only)]

    _remove_stale_tmp(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        complete = is_complete(out)
        if complete:
            built = Manifest.load(out)
            d, settings = built.data, stored_settings(cfg)
            same = built_settings(d.get("config")) == settings and d.get("limit") == limit \
                and sorted(d["corpora"]) == sorted(selected)
            if same and d.get("format_version") == FORMAT_VERSION:
                if progress:
                    print(f"{out} is already this build; nothing to do (overwrite=True rebuilds it)")
                return built
            state = (f"of format {d.get('format_version')}, this mllm writes format {FORMAT_VERSION}" if same
                     else "a complete build of other settings")
        else:
            state = "not a complete build (no manifest.json)"
        raise FileExistsError(f"{out} already exists and is {state}; pass overwrite=True (--overwrite) to replace it")

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    started = time.time()
    try:
        ctx = BuildContext(cfg=cfg, root=tmp, limit=limit, progress=progress)
        results: dict[str, CorpusResult] = {}
        for name in selected:
            results[name] = get_corpus(name)(ctx)
        data = _manifest_data(cfg, tmp, results, limit)
        atomic_write_text(tmp / MANIFEST, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # the earlier build stays where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"built {', '.join(selected)} into {out} in {time.time() - started:.1f} s")
    return Manifest(out / MANIFEST, data)


def _manifest_data(cfg: BuildConfig, root: Path, results: dict[str, CorpusResult], limit: int | None) -> dict:
    from mllm import __version__
    import hashlib

    corpora = {}
    for name, r in results.items():
        files, digests = {}, {}
        for split in SPLITS:
            p = root / name / f"{split}.jsonl"
            if p.is_file():
                files[split] = f"{name}/{split}.jsonl"
                digests[split] = hashlib.sha256(p.read_bytes()).hexdigest()
        corpora[name] = {
            "sources": [s.to_dict() for s in r.sources],
            "licences": sorted({s.licence for s in r.sources}),
            "counts": r.counts,
            "tasks": r.tasks,
            "files": files,
            "sha256": digests,
            "eval_only": r.eval_only,
            **r.extra,
        }
    return {
        "format_version": FORMAT_VERSION,
        "mllm_version": __version__,
        "seed": cfg.seed,
        "limit": limit,
        "splits": list(SPLITS),
        "eval_only": sorted(n for n, r in results.items() if r.eval_only),
        "held_out_voices": {
            "accents": list(cfg.voices.held_out_accents),
            "variants": list(cfg.voices.held_out_variants),
        },
        "config": to_dict(cfg),
        "corpora": corpora,
    }


def _remove_stale_tmp(out: Path) -> None:
    """Tidy up after builds whose process is gone: delete their `OUT.tmp-<pid>` folders, and their `OUT.old-<pid>`
    (the earlier build, moved aside just before the new one went in), or, if the kill came between the two
    renames and left no `OUT`, put it back."""
    for p in sorted(out.parent.glob(f"{out.name}.*-*")) if out.parent.is_dir() else []:
        kind, _, pid = p.name[len(out.name) + 1:].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if not process_gone(int(pid)):  # a build still running
            continue
        if kind == "old" and not out.exists():
            os.replace(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)


__all__ = [
    "BuildConfig", "ConfigError", "Counts", "Fractions", "Manifest", "build_corpora", "from_dict",
    "is_complete", "load_build_config",
]
