"""espeak-ng speech: digit strings, words, short sentences and spoken questions, in both directions.

Every utterance is written once and used by up to three records: `asr`
(audio -> transcript), `speech_qa` (audio -> answer: the number said, or the
answer to the spoken question) and `tts` (text -> audio).

Honest splits:
- Voices. A voice is an accent plus a variant (`en-gb-scotland+f3`). Test uses
  only voices with a held-out accent or variant (`voices.held_out_*`); train
  and validation never use those. Train and validation also hear learners'
  accents (`voices.learner_accents`): another language's voice saying the
  English phonemes of one training accent, and Flite voices
  (`voices.flite_voices`, `flite_share` of their utterances): another
  synthesizer, made from recordings of real speakers. Test uses neither.
- Texts. Digit strings of 2+ digits, words, sentences and questions are each
  assigned to one split by a stable hash, so a test text is never heard in
  training. Single digits (only ten) are shared by all splits.
- Utterances. No (text, voice, rate, pitch, gap) is used twice in the build.
"""

from __future__ import annotations

import io
import itertools
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf

from mllm.data import sources
from mllm.data.corpora import (
    DIGIT_WORDS, DIRECTIONS, SPLITS, BuildContext, CorpusResult, assistant, media_part, register_corpus,
    split_by_hash, split_exact, text, user,
)

ESPEAK_RATE = 22050

COLORS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray")
ANIMALS = (
    "cat", "dog", "frog", "bird", "fish", "horse", "cow", "pig", "sheep", "goat", "duck", "mouse", "lion",
    "tiger", "bear", "fox", "owl", "bee", "whale", "rabbit", "zebra", "camel", "monkey", "snake", "turtle",
    "elephant", "giraffe", "penguin", "spider", "dolphin",
)
THINGS = (
    "apple", "banana", "ball", "book", "car", "bus", "train", "boat", "plane", "house", "tree", "flower",
    "chair", "table", "cup", "hat", "shoe", "door", "window", "clock", "phone", "key", "box", "bed", "star",
    "moon", "sun", "cloud", "rain", "bread", "cake", "egg", "milk", "water", "pencil", "paper", "kite",
    "drum", "bell", "rocket", "bottle", "hammer", "bicycle", "guitar", "lamp", "candle", "map", "coin",
)
OTHER_WORDS = (
    "yes", "no", "hello", "goodbye", "please", "thanks", "big", "small", "hot", "cold", "fast", "slow",
    "happy", "sad", "open", "close", "stop", "go", "run", "walk", "jump", "sing", "read", "write", "draw",
    "play", "eat", "drink", "sleep", "morning", "night", "today", "tomorrow", "left", "right", "up", "down",
    "ten", "eleven", "twelve", "twenty", "hundred", "first", "last", "number", "picture", "sound", "video",
)
NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Omar", "Mei", "Luis", "Sara", "Tom")
TENS = {10: "ten", 11: "eleven", 12: "twelve", 13: "thirteen", 14: "fourteen", 15: "fifteen",
        16: "sixteen", 17: "seventeen", 18: "eighteen"}


def number_words(n: int) -> str:
    return DIGIT_WORDS[n] if n < 10 else TENS[n]


def digit_words(s: str) -> str:
    """'314' -> 'three one four'."""
    return " ".join(DIGIT_WORDS[int(c)] for c in s)


IRREGULAR = {"mouse": "mice", "sheep": "sheep", "fish": "fish"}


def plural(noun: str) -> str:
    if noun in IRREGULAR:
        return IRREGULAR[noun]
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    words = set(COLORS) | set(ANIMALS) | set(THINGS) | set(OTHER_WORDS)
    return tuple(sorted(words))


@lru_cache(maxsize=1)
def sentence_pool() -> tuple[str, ...]:
    """Short sentences from templates (lowercase, no punctuation: what the transcript looks like)."""
    nouns = ANIMALS + THINGS
    out = set()
    for c, n in itertools.product(COLORS, nouns):
        out.add(f"the {n} is {c}")
        out.add(f"i see {article(c)} {c} {n}")
    for d, n in itertools.product(DIGIT_WORDS[2:], ANIMALS):
        out.add(f"there are {d} {plural(n)}")
    for d in DIGIT_WORDS:
        out.add(f"show me {article(d)} {d}")
        out.add(f"please write the number {d}")
        for dr in DIRECTIONS:
            out.add(f"the {d} moves {dr}")
    for name, n in itertools.product(NAMES, nouns):
        out.add(f"{name.lower()} has {article(n)} {n}")
        out.add(f"where is the {n}")
    for n in nouns:
        out.add(f"can you draw {article(n)} {n}")
        out.add(f"this is my {n}")
    return tuple(sorted(out))


@lru_cache(maxsize=1)
def question_pool() -> tuple[tuple[str, str, str], ...]:
    """(spoken question, answer, kind): small arithmetic and number facts."""
    out = []
    for a, b in itertools.product(range(10), range(10)):
        out.append((f"what is {DIGIT_WORDS[a]} plus {DIGIT_WORDS[b]}", str(a + b), "add"))
        if a >= b:
            out.append((f"what is {DIGIT_WORDS[a]} minus {DIGIT_WORDS[b]}", str(a - b), "subtract"))
    for n in range(10):
        if n < 9:
            out.append((f"what comes after {DIGIT_WORDS[n]}", str(n + 1), "after"))
        if n > 0:
            out.append((f"what comes before {DIGIT_WORDS[n]}", str(n - 1), "before"))
        out.append((f"is {DIGIT_WORDS[n]} even or odd", "even" if n % 2 == 0 else "odd", "parity"))
        out.append((f"what is double {DIGIT_WORDS[n]}", str(2 * n), "double"))
    return tuple(sorted(out))


# ---------------------------------------------------------------- voices and synthesis


@dataclass(frozen=True)
class Voice:
    accent: str
    variant: str
    rate: int
    pitch: int
    gap: int
    gain: float  # peak level
    snr_db: float | None  # None: no noise
    noise_seed: int
    held_out: bool
    reads: str | None = None  # a learner's voice: the English accent whose phonemes it says; None reads the text
    engine: str | None = None  # "flite": the variant is a Flite voice and `gap` is unused; None: espeak-ng

    @property
    def name(self) -> str:
        return f"{self.accent}+{self.variant}"

    def meta(self) -> dict:
        d = asdict(self)
        d.pop("noise_seed")
        for key in ("reads", "engine"):
            if d[key] is None:
                d.pop(key)
        d["voice"] = self.name
        d["gain"] = round(self.gain, 4)
        d["snr_db"] = None if self.snr_db is None else round(self.snr_db, 2)
        return d


def sample_voice(rng: np.random.Generator, vcfg, split: str) -> Voice:
    """A random voice of `split`: test draws only voices with a held-out accent or variant."""
    ho_a, ho_v = set(vcfg.held_out_accents), set(vcfg.held_out_variants)
    engine = None
    if split == "test":
        while True:
            accent = vcfg.accents[rng.integers(len(vcfg.accents))]
            variant = vcfg.variants[rng.integers(len(vcfg.variants))]
            if accent in ho_a or variant in ho_v:
                break
    elif vcfg.flite_share and rng.random() < vcfg.flite_share:  # no draw at share 0: espeak-only builds stay as they were
        engine = accent = "flite"
        variant = vcfg.flite_voices[rng.integers(len(vcfg.flite_voices))]
    else:  # learners' accents join the pool: one draw either way, so the texts drawn after it do not move
        accents = [a for a in vcfg.accents if a not in ho_a] + list(vcfg.learner_accents)
        variants = [v for v in vcfg.variants if v not in ho_v]
        accent = accents[rng.integers(len(accents))]
        variant = variants[rng.integers(len(variants))]
    rate = int(rng.integers(vcfg.rate[0], vcfg.rate[1] + 1))
    pitch = int(rng.integers(vcfg.pitch[0], vcfg.pitch[1] + 1))
    gap = int(rng.integers(vcfg.word_gap[0], vcfg.word_gap[1] + 1))
    gain = float(rng.uniform(*vcfg.gain))
    noisy = rng.random() < vcfg.noise_prob
    snr = float(rng.uniform(*vcfg.snr_db))
    seed = int(rng.integers(2**31))
    return Voice(accent, variant, rate, pitch, gap, gain, snr if noisy else None, seed,
                 accent in ho_a or variant in ho_v, vcfg.learner_phonemes if accent in vcfg.learner_accents else None,
                 engine)


class SynthesisError(RuntimeError):
    """A synthesizer (espeak-ng or Flite) gave no audio, or not the audio expected."""


def espeak(text_: str, voice: Voice, binary: str | None = None) -> np.ndarray:
    """float32 [N] at 22,050 Hz; the same arguments always give the same samples."""
    args = ["-v", voice.name, "-s", str(voice.rate), "-p", str(voice.pitch), "-g", str(voice.gap)]
    try:
        said = text_ if voice.reads is None else f"[[{phonemes(text_, voice.reads, binary)}]]"
        return _espeak_raw(said, args, binary)
    except SynthesisError as e:
        raise SynthesisError(f"espeak-ng gave no audio for {text_!r} with voice {voice.name}: {e}") from None


def flite(text_: str, voice: Voice, binary: str | None = None) -> tuple[np.ndarray, int]:
    """float32 [N] and its sample rate (8 kHz for `kal`, 16 kHz for the others); the same arguments always give
    the same samples. The voice's espeak-style rate and pitch become Flite's pace and mean F0."""
    stretch = 175 / voice.rate  # espeak-ng's 175 words per minute is about Flite's own pace
    f0 = 70 + 2 * voice.pitch  # pitch 25..75 -> a mean F0 of 120..220 Hz
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "said.wav"
        res = subprocess.run([binary or sources.flite_binary(), "-voice", voice.variant, "-t", text_, "-o", str(out),
                              "--setf", f"duration_stretch={stretch:.4f}", "--setf", f"int_f0_target_mean={f0}"],
                             capture_output=True, timeout=60, check=False)
        if res.returncode != 0 or not out.is_file() or out.stat().st_size <= 44:
            reason = res.stderr.decode(errors="replace").strip() or f"exit {res.returncode}, no audio"
            raise SynthesisError(f"flite gave no audio for {text_!r} with voice {voice.variant}: {reason}")
        samples, rate = sf.read(out, dtype="float32", always_2d=True)
    return samples[:, 0], rate


def flite_voices(binary: str | None = None) -> list[str]:
    """The voices `flite -lv` lists. Flite reads an unknown `-voice` as its default voice, without an error."""
    res = subprocess.run([binary or sources.flite_binary(), "-lv"], capture_output=True, timeout=60, check=False)
    return res.stdout.decode(errors="replace").split(":", 1)[-1].split()


@lru_cache(maxsize=65536)
def phonemes(text_: str, accent: str, binary: str | None = None) -> str:
    """`accent`'s espeak phoneme mnemonics for `text_` ("three" -> "Tr'i:"), one line: what a learner's voice says."""
    res = subprocess.run([binary or sources.espeak_binary(), "-v", accent, "-q", "-x", text_],
                         capture_output=True, timeout=60, check=False)
    said = " ".join(res.stdout.decode(errors="replace").split())
    if res.returncode != 0 or not said:
        raise SynthesisError(res.stderr.decode(errors="replace").strip() or f"no phonemes for {text_!r} in {accent}")
    return said


def check_voices(vcfg, binary: str | None = None) -> None:
    """Fail early on a voice espeak-ng does not have.

    An unknown accent gives no audio; an unknown variant is silently ignored by
    espeak-ng, so a variant must change the audio of its accent.
    """
    key = (tuple(vcfg.accents), tuple(vcfg.variants), tuple(vcfg.learner_accents), tuple(vcfg.flite_voices), binary)
    if key in _CHECKED:
        return
    if vcfg.flite_voices:
        known = flite_voices()
        if missing := [v for v in vcfg.flite_voices if v not in known]:
            raise ValueError(f"voices.flite_voices: flite has no voice {missing[0]!r} (it has {', '.join(known)})")
    probe = "one two three"
    plain = {}
    for name in ("accents", "learner_accents"):
        for accent in getattr(vcfg, name):
            try:
                plain[accent] = _espeak_raw(probe, ["-v", accent], binary)
            except SynthesisError as e:
                raise ValueError(f"voices.{name}: espeak-ng has no voice {accent!r} ({e})") from None
    accent = vcfg.accents[0]
    for variant in vcfg.variants:
        out = _espeak_raw(probe, ["-v", f"{accent}+{variant}"], binary)
        if np.array_equal(out, plain[accent]):
            raise ValueError(
                f"voices.variants: espeak-ng has no variant {variant!r} (list them: espeak-ng --voices=variant)"
            )
    _CHECKED.add(key)


_CHECKED: set = set()


def _espeak_raw(text_: str, args: list[str], binary: str | None) -> np.ndarray:
    res = subprocess.run([binary or sources.espeak_binary(), *args, "--stdout", text_],
                         capture_output=True, timeout=60, check=False)
    if res.returncode != 0 or not res.stdout:
        raise SynthesisError(res.stderr.decode(errors="replace").strip() or f"exit {res.returncode}, no audio")
    samples, rate = sf.read(io.BytesIO(res.stdout), dtype="float32", always_2d=True)
    if rate != ESPEAK_RATE:
        raise SynthesisError(f"espeak-ng wrote {rate} Hz, expected {ESPEAK_RATE}")
    return samples[:, 0]


def synthesize(text_: str, voice: Voice, sample_rate: int, binary: str | None = None):
    """An `Audio` [1, N] at `sample_rate`: espeak-ng (or Flite), resampled, trimmed, level-set, with optional noise."""
    from mllm.media import Audio

    x, rate = flite(text_, voice) if voice.engine == "flite" else (espeak(text_, voice, binary), ESPEAK_RATE)
    audio = Audio(x[None, :], rate).resample(sample_rate)
    y = audio.samples[0].astype(np.float64)
    nz = np.flatnonzero(np.abs(y) > 1e-3)
    if len(nz):  # trim silence, keep 50 ms either side
        pad = int(0.05 * sample_rate)
        y = y[max(0, nz[0] - pad): nz[-1] + pad]
    peak = float(np.abs(y).max()) or 1.0
    y = y * (voice.gain / peak)
    if voice.snr_db is not None:
        rms = float(np.sqrt(np.mean(y**2))) or 1e-4
        noise = np.random.default_rng(voice.noise_seed).standard_normal(len(y))
        y = y + noise * rms / (10 ** (voice.snr_db / 20))
    return Audio(np.clip(y, -1, 1).astype(np.float32)[None, :], sample_rate)


# ---------------------------------------------------------------- texts


@dataclass(frozen=True)
class Utterance:
    kind: str  # digits | words | sentences | questions
    transcript: str  # what is spoken, lowercase
    answer: str | None = None  # speech_qa answer
    digits: str | None = None
    question_kind: str | None = None


class TextSampler:
    """Draws utterance texts of one split; texts other than single digits belong to exactly one split."""

    def __init__(self, scfg, split: str):
        self.split = split
        self.max_digits = scfg.max_digits
        fr = scfg.text_fractions
        self.fractions = fr
        words = split_exact(word_pool(), fr, salt="speech-words")
        self.words = [w for w in word_pool() if words[w] == split]
        self.sentences = [s for s in sentence_pool() if split_by_hash(s, fr, salt="speech-sentences") == split]
        qs = split_exact([q for q, _, _ in question_pool()], fr, salt="speech-questions")
        self.questions = [q for q in question_pool() if qs[q[0]] == split]
        mix = scfg.mix
        self.kinds = ["digits", "words", "sentences", "questions"]
        p = np.array([mix.digits, mix.words, mix.sentences, mix.questions], dtype=np.float64)
        for i, pool in enumerate([None, self.words, self.sentences, self.questions]):
            if pool is not None and not pool:
                p[i] = 0.0
        self.p = p / p.sum()

    def digit_string(self, rng: np.random.Generator) -> str:
        lengths = np.arange(1, self.max_digits + 1)
        w = np.array([2.0] + [1.0] * (self.max_digits - 1))
        length = int(rng.choice(lengths, p=w / w.sum()))
        for _ in range(1000):
            s = "".join(str(int(d)) for d in rng.integers(0, 10, size=length))
            if length == 1 or split_by_hash(s, self.fractions, salt="speech-digits") == self.split:
                return s
        return s[:1]

    def sample(self, rng: np.random.Generator) -> Utterance:
        kind = self.kinds[int(rng.choice(4, p=self.p))]
        if kind == "digits":
            s = self.digit_string(rng)
            return Utterance("digits", digit_words(s), answer=s, digits=s)
        if kind == "words":
            return Utterance("words", self.words[rng.integers(len(self.words))])
        if kind == "sentences":
            return Utterance("sentences", self.sentences[rng.integers(len(self.sentences))])
        q, a, qk = self.questions[rng.integers(len(self.questions))]
        return Utterance("questions", q, answer=a, question_kind=qk)


ASR_PROMPTS = ("Transcribe the audio.", "What was said?", "Write down what you hear.")
NUMBER_PROMPTS = ("What number was said? Answer with digits.", "Which number do you hear? Answer with digits.")
QUESTION_PROMPTS = ("Answer the spoken question.", "Listen and answer.")
TTS_PROMPTS = ('Say "{t}".', "Read this aloud: {t}", "Speak: {t}")


def records_for(utt: Utterance, rel: str, meta: dict, rng: np.random.Generator, tasks) -> list[tuple[str, list, dict]]:
    """(task, messages, meta) for one utterance written at `rel`."""
    audio = media_part("audio", rel)
    heard = audio | {"transcript": utt.transcript}  # what the user's clip says: the CTC term's target
    asr_p = ASR_PROMPTS[rng.integers(len(ASR_PROMPTS))]
    num_p = NUMBER_PROMPTS[rng.integers(len(NUMBER_PROMPTS))]
    q_p = QUESTION_PROMPTS[rng.integers(len(QUESTION_PROMPTS))]
    tts_p = TTS_PROMPTS[rng.integers(len(TTS_PROMPTS))].format(t=utt.transcript)
    out = []
    if "asr" in tasks:
        out.append(("asr", [user(heard, text(asr_p)), assistant(text(utt.transcript))], meta))
    if "speech_qa" in tasks and utt.answer is not None:
        prompt = num_p if utt.kind == "digits" else q_p
        out.append(("speech_qa", [user(heard, text(prompt)), assistant(text(utt.answer))],
                    {**meta, "question": prompt}))
    if "tts" in tasks:
        out.append(("tts", [user(text(tts_p)), assistant(audio)], {**meta, "prompt": tts_p}))
    return out


def plan_utterances(ctx: BuildContext, split: str, n: int, used: set, stream: str) -> list[tuple[Utterance, Voice]]:
    """`n` distinct (text, voice) pairs for `split`; `used` keeps them distinct across splits."""
    rng = ctx.rng(stream, split)
    sampler = TextSampler(ctx.cfg.speech, split)
    plan = []
    while len(plan) < n:
        utt = sampler.sample(rng)
        voice = sample_voice(rng, ctx.cfg.voices, split)
        key = (utt.transcript, voice.name, voice.rate, voice.pitch, voice.gap)
        if key in used:
            continue
        used.add(key)
        plan.append((utt, voice))
    return plan


@register_corpus("speech")
def build(ctx: BuildContext) -> CorpusResult:
    from mllm.media import save_audio

    cfg = ctx.cfg.speech
    infos = [sources.source_info("espeak")] + ([sources.source_info("flite")] if ctx.cfg.voices.flite_share else [])
    binary = sources.espeak_binary()
    check_voices(ctx.cfg.voices, binary)
    sr = ctx.cfg.sample_rate
    used: set = set()
    plans = {s: plan_utterances(ctx, s, ctx.cap(cfg.utterances.get(s)), used, "speech") for s in SPLITS}
    out = ctx.output("speech")
    bar = ctx.bar(sum(len(p) for p in plans.values()), "speech")
    seconds = {s: 0.0 for s in SPLITS}
    with out, ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        for split in SPLITS:
            rng = ctx.rng("speech-records", split)

            def job(item, split=split):
                k, (utt, voice) = item
                path, rel = out.media(split, f"{k:06d}.wav")
                audio = synthesize(utt.transcript, voice, sr, binary)
                save_audio(audio, path)
                return rel, audio.duration

            for (utt, voice), (rel, dur) in zip(plans[split], pool.map(job, enumerate(plans[split]))):
                seconds[split] += dur
                meta = {"kind": utt.kind, "transcript": utt.transcript, **voice.meta(), "duration": round(dur, 3)}
                if utt.digits is not None:
                    meta["digits"] = utt.digits
                if utt.answer is not None:
                    meta["answer"] = utt.answer
                if utt.question_kind is not None:
                    meta["question_kind"] = utt.question_kind
                for task, messages, m in records_for(utt, rel, meta, rng, cfg.tasks):
                    out.add(split, task, messages, m)
                bar.update(1)
    bar.close()
    v = ctx.cfg.voices
    return CorpusResult(
        name="speech", sources=infos, counts=dict(out.counts), tasks=out.tasks,
        extra={
            "utterances": {s: len(p) for s, p in plans.items()},
            "hours": {s: round(seconds[s] / 3600, 4) for s in SPLITS},
            "held_out_voices": {"accents": list(v.held_out_accents), "variants": list(v.held_out_variants),
                                "rule": "test uses only voices with a held-out accent or variant; "
                                        "train and validation never use them"},
            "learner_accents": {"accents": list(v.learner_accents), "reading": v.learner_phonemes,
                                "rule": "train and validation only: these voices say the reading accent's phonemes"},
            **({"flite_voices": {"voices": list(v.flite_voices), "share": v.flite_share,
                                 "rule": "train and validation only: this share of their utterances"}}
               if v.flite_share else {}),
            "held_out_texts": "digit strings of 2+ digits, words, sentences and questions belong to one split "
                              "each (stable hash); single digits are shared",
        },
    )
