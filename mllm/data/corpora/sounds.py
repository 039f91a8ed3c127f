"""Tux Paint stamp sound effects with their captions, and the eval-only spoken numbers.

`sounds`: a stamp's sound effect is the `.ogg`/`.wav` named like its PNG
(`frog.ogg` beside `frog.png`); its caption is the stamp's. Split by caption
group, like the stamps. Tasks: sound_caption, sound_qa (4-way choice of
captions), sound_generation (caption -> sound).

`spoken_numbers`: the `symbols/math` recordings of the number names 0-9 in
every language (`3.ogg`, `3_fr.ogg`, `3_desc_ru.ogg`, ...). Human voices: they
are reserved for evaluation, written to `spoken_numbers/test.jsonl` only, and
never used by any other corpus.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mllm.data import sources
from mllm.data.corpora import (
    DIGIT_WORDS, SPLITS, BuildContext, CorpusResult, assistant, choice_letters, media_part,
    multiple_choice_prompt, normalise_caption, register_corpus, split_exact, text, user,
)
from mllm.data.corpora.stamps import read_caption

AUDIO_SUFFIXES = (".ogg", ".wav")
SILENCE = 1e-3  # peak below this: a silent placeholder file, skipped
EVAL_ONLY_DIR = "symbols/math"  # spoken number names: evaluation only

CAPTION_PROMPTS = ("What is making this sound?", "Describe the sound.", "What do you hear?")
GEN_PROMPTS = ("Make the sound of this: {c}", "Play a sound for: {c}", "What does this sound like? {c}")


@dataclass(frozen=True)
class Sound:
    path: Path
    rel: str  # under the stamps dir, without suffix
    caption: str
    category: str

    @property
    def group(self) -> str:
        return normalise_caption(self.caption)


def is_eval_only(rel: str) -> bool:
    """True for any file under the reserved `symbols/math` folder."""
    return rel == EVAL_ONLY_DIR or rel.startswith(EVAL_ONLY_DIR + "/")


def find_sounds(root: Path | None = None) -> list[Sound]:
    """Stamp sound effects with captions, outside the reserved spoken-number folder, sorted by path."""
    root = root or sources.stamps_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        if is_eval_only(rel_dir):
            continue
        names = set(filenames)
        for name in sorted(filenames):
            stem, suffix = os.path.splitext(name)
            if suffix not in AUDIO_SUFFIXES or f"{stem}.png" not in names or f"{stem}.txt" not in names:
                continue
            caption = read_caption(Path(dirpath) / f"{stem}.txt")
            if caption:
                rel = f"{rel_dir}/{stem}" if rel_dir != "." else stem
                out.append(Sound(Path(dirpath) / name, rel, caption, rel.split("/")[0]))
    return out


@register_corpus("sounds")
def build(ctx: BuildContext) -> CorpusResult:
    from mllm.media import load_audio, save_audio

    cfg = ctx.cfg.sounds
    info = sources.source_info("stamps")
    found = find_sounds()
    if cfg.max_sounds is not None:
        step = max(1, len(found) // cfg.max_sounds)
        found = found[::step][: cfg.max_sounds]
    # load first: a few stamps ship a silent placeholder sound, which is no sound effect
    audios, silent = {}, []
    for snd in found:
        audio = load_audio(snd.path, sample_rate=ctx.cfg.sample_rate, mono=True, max_duration_s=cfg.max_seconds)
        if float(abs(audio.samples).max()) < SILENCE:
            silent.append(snd.rel)
        else:
            audios[snd.rel] = audio
    found = [s for s in found if s.rel in audios]
    assign = split_exact([s.group for s in found], cfg.fractions, salt="sounds")
    by_split = {sp: [s for s in found if assign[s.group] == sp] for sp in SPLITS}
    by_split = {sp: v[: ctx.cap(len(v))] for sp, v in by_split.items()}
    out = ctx.output("sounds")
    bar = ctx.bar(sum(len(v) for v in by_split.values()), "sounds")
    k_choices = cfg.num_choices
    with out:
        for split in SPLITS:
            rng = ctx.rng("sounds", split)
            pool = by_split[split]
            for k, snd in enumerate(pool):
                audio = audios[snd.rel]
                path, rel = out.media(split, f"{k:06d}.wav")
                save_audio(audio, path)
                part = media_part("audio", rel)
                base = {"stamp": snd.rel, "caption": snd.caption, "category": snd.category,
                        "duration": round(audio.duration, 3)}
                cap_p = CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))]
                gen_p = GEN_PROMPTS[rng.integers(len(GEN_PROMPTS))].format(c=snd.caption)
                others = sorted({s.caption for s in pool if s.group != snd.group})
                choices = None
                if len(others) >= k_choices - 1:
                    picks = rng.choice(len(others), size=k_choices - 1, replace=False)
                    answer = int(rng.integers(k_choices))
                    choices = [others[i] for i in picks]
                    choices.insert(answer, snd.caption)
                if "sound_caption" in cfg.tasks:
                    out.add(split, "sound_caption", [user(part, text(cap_p)), assistant(text(snd.caption))], base)
                if "sound_qa" in cfg.tasks and choices is not None:
                    letter = choice_letters(k_choices)[answer]
                    prompt = multiple_choice_prompt("Which caption matches the sound?", choices)
                    out.add(split, "sound_qa", [user(part, text(prompt)), assistant(text(letter))],
                            {**base, "choices": choices, "answer": answer, "answer_letter": letter})
                if "sound_generation" in cfg.tasks:
                    out.add(split, "sound_generation", [user(text(gen_p)), assistant(part)], {**base, "prompt": gen_p})
                bar.update(1)
    bar.close()
    return CorpusResult(
        name="sounds", sources=[info], counts=dict(out.counts), tasks=out.tasks,
        extra={
            "sounds_per_split": {s: len(v) for s, v in by_split.items()},
            "split_rule": "by caption group (exact fractions over groups ordered by a stable hash)",
            "excluded": f"{EVAL_ONLY_DIR} (spoken numbers, evaluation only)",
            "skipped_silent": silent,
        },
    )


# ---------------------------------------------------------------- spoken numbers (eval only)

_SPOKEN = re.compile(r"^(?P<digit>\d)(?P<desc>_desc)?(?:_(?P<lang>[A-Za-z]{2,3}(?:_[A-Za-z]{2})?))?$")


@dataclass(frozen=True)
class SpokenNumber:
    path: Path
    digit: int
    language: str  # "en" for the unsuffixed recording
    kind: str  # "name" | "desc"
    transcript: str | None  # from the stamp's .txt, in that language


def _translations(txt: Path) -> dict[str, str]:
    out = {}
    lines = txt.read_text(encoding="utf-8", errors="replace").splitlines() if txt.is_file() else []
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if sep and key.endswith(".utf8"):
            out[key[: -len(".utf8")].lower()] = value.strip()
        elif i == 0:
            out["en"] = line
    return out


def find_spoken_numbers(root: Path | None = None) -> list[SpokenNumber]:
    """Every recording of a number name 0-9 in `symbols/math` (not its sub-folders)."""
    root = root or sources.stamps_dir()
    folder = root / EVAL_ONLY_DIR
    out = []
    for name in sorted(os.listdir(folder)):
        stem, suffix = os.path.splitext(name)
        stem = stem.removesuffix(".ogg")  # one file is named like `x.ogg.ogg`
        m = _SPOKEN.match(stem)
        if suffix not in AUDIO_SUFFIXES or not m:
            continue
        digit = int(m["digit"])
        lang = m["lang"] or "en"
        trans = _translations(folder / f"{digit}.txt")
        transcript = trans.get(lang.lower()) or trans.get(lang.split("_")[0].lower())
        if transcript:
            transcript = transcript.strip().rstrip(".").strip()
        out.append(SpokenNumber(folder / name, digit, lang, "desc" if m["desc"] else "name", transcript))
    return out


NUMBER_PROMPT = "Which number is spoken? Answer with a digit."


@register_corpus("spoken_numbers")
def build_spoken_numbers(ctx: BuildContext) -> CorpusResult:
    from mllm.media import load_audio, save_audio

    info = sources.source_info("stamps")
    found = find_spoken_numbers()
    found = found[: ctx.cap(len(found))]
    out = ctx.output("spoken_numbers", splits=("test",))
    bar = ctx.bar(len(found), "spoken_nums")
    langs: dict[str, int] = {}
    with out:
        for k, rec in enumerate(found):
            audio = load_audio(rec.path, sample_rate=ctx.cfg.sample_rate, mono=True, max_duration_s=10.0)
            path, rel = out.media("test", f"{k:06d}.wav")
            save_audio(audio, path)
            part = media_part("audio", rel)
            meta = {"digit": rec.digit, "answer": str(rec.digit), "language": rec.language, "kind": rec.kind,
                    "transcript": rec.transcript, "recording": rec.path.name, "eval_only": True,
                    "duration": round(audio.duration, 3)}
            langs[rec.language] = langs.get(rec.language, 0) + 1
            out.add("test", "speech_qa", [user(part, text(NUMBER_PROMPT)), assistant(text(str(rec.digit)))], meta)
            if rec.language.split("_")[0] == "en":
                word = DIGIT_WORDS[rec.digit]
                out.add("test", "asr", [user(part, text("Transcribe the audio.")), assistant(text(word))],
                        {**meta, "transcript": word})
            bar.update(1)
    bar.close()
    return CorpusResult(
        name="spoken_numbers", sources=[info], counts=dict(out.counts), tasks=out.tasks, eval_only=True,
        extra={
            "note": "human recordings of the number names 0-9 (Tux Paint symbols/math): evaluation only; "
                    "never train or tune on them",
            "languages": dict(sorted(langs.items())),
        },
    )
