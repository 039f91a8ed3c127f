"""The embedded default model ships with the package, loads, and answers a fixed question correctly, every time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mllm.checkpoint import load_checkpoint
from mllm.default import VARIANTS, default_checkpoint
from mllm.default.corpus import prepare_corpora
from mllm.default.paths import CHECKPOINTS
from mllm.default.ship import size_mb
from mllm.eval.predictor import ModelPredictor
from mllm.media import Audio, Image
from mllm.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from mllm.data.corpora.build import build_corpora

    out = tmp_path_factory.mktemp("corpora")
    build_corpora(ROOT / "data" / "build_small.yaml", out, only=["digits"], progress=False, overwrite=True)
    return out


@pytest.fixture(scope="module")
def predictor() -> ModelPredictor:
    model, processor = load_checkpoint(default_checkpoint())
    return ModelPredictor(model, processor)


def test_shipped_checkpoint_is_small_and_float16():
    assert size_mb(CHECKPOINTS) <= 30.0
    from safetensors import safe_open

    for file in CHECKPOINTS.rglob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            assert all(f.get_slice(k).get_dtype() != "F32" for k in f.keys()), file


def test_shipped_configs_name_no_build_directory():
    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        return [s for v in value for s in strings(v)] if isinstance(value, list) else [value]

    for file in CHECKPOINTS.rglob("*.json"):
        absolute = [s for s in strings(json.loads(file.read_text())) if isinstance(s, str) and s.startswith("/")]
        assert not absolute, (file, absolute)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_loads_as_a_float32_pipeline(variant):
    pipe = Pipeline.from_pretrained(default_checkpoint(variant))
    assert {p.dtype for p in pipe.model.parameters()} == {torch.float32}
    assert set(pipe.detokenizers) == set(pipe.processor.media_tokenizers) == {"image", "audio", "video"}
    head = pipe.model.config.heads["image"]["name"]
    assert head == variant


def test_a_seeded_reply_draws_and_speaks_the_same_media_every_run():
    """The de-tokenizers sample (diffusion noise, Griffin-Lim's phases): the generation's seed seeds them too."""
    from mllm.generation import GenerationConfig

    pipe = Pipeline.from_pretrained(default_checkpoint())
    asks = [[{"role": "user", "content": [{"type": "text", "text": text}]}]
            for text in ("Draw the digit 7.", 'Say "three six zero".')]

    def media(seed: int, global_seed: int) -> list[np.ndarray]:
        torch.manual_seed(global_seed)  # the global RNG differs from run to run; it must not matter
        replies = pipe.chat(asks, GenerationConfig(max_new_tokens=80, seed=seed))
        return [m.pixels if isinstance(m, Image) else m.samples for reply in replies for m in reply
                if isinstance(m, (Image, Audio))]

    first = media(0, global_seed=1)
    assert len(first) == 2
    assert all(np.array_equal(a, b) for a, b in zip(first, media(0, global_seed=2)))
    assert not np.array_equal(first[0], media(1, global_seed=1)[0])


def _digit_questions(digits: Path) -> list[list[dict]]:
    """'What digit is this?' about one test image of each digit, 0 to 9."""
    records = [json.loads(line) for line in (digits / "digits" / "test.jsonl").read_text().splitlines()]
    images = {r["meta"]["label"]: digits / "digits" / r["messages"][0]["content"][0]["path"]
              for r in records if r["task"] == "image_qa"}
    return [[{"role": "user", "content": [{"type": "image", "path": str(images[d])},
                                          {"type": "text", "text": "What digit is this?"}]}] for d in range(10)]


def test_a_fixed_question_gets_the_same_answer_every_time(digits, predictor):
    conversations = _digit_questions(digits)
    first = predictor.complete(conversations, max_new_tokens=6)
    assert predictor.complete(conversations, max_new_tokens=6) == first  # greedy: deterministic
    assert all(answer in "0123456789" and len(answer) == 1 for answer in first), first


def test_a_fixed_question_gets_the_right_answer(digits, predictor):
    answers = predictor.complete(_digit_questions(digits), max_new_tokens=6)
    assert sum(answer == str(d) for d, answer in enumerate(answers)) >= 9, answers


@pytest.fixture(scope="module")
def spoken_strings(tmp_path_factory) -> list:
    """Digit strings in four voices of a held-out accent (en-029), at speeds the test split has."""
    from mllm.data.corpora.speech import Voice, synthesize
    from mllm.eval.tasks import Item, MediaRef
    from mllm.media import save_audio

    out = tmp_path_factory.mktemp("spoken")
    texts = ["five eight", "two one nine", "eight three seven", "six two two", "seven one", "zero nine four three",
             "eight six zero", "three three seven nine"]
    voices = [Voice("en-029", variant, rate, 50, 3, 0.6, None, 0, True)
              for variant, rate in (("m7", 200), ("klatt3", 190), ("f4", 180), ("steph", 205))]
    items = []
    for k, text in enumerate(texts):
        for j, voice in enumerate(voices):
            path = save_audio(synthesize(text, voice, 16000), out / f"{k}-{j}.wav")
            items.append(Item(f"{k}-{j}", "Transcribe the audio.", text, [MediaRef("audio", str(path))]))
    return items


def test_transcriptions_read_the_spoken_slots_too(spoken_strings, predictor):
    """The shipped LM spells speech at its audio slots; joint CTC/attention decoding keeps what both readings hear."""
    import jiwer

    refs = [item.answer for item in spoken_strings]
    greedy = predictor.answer(spoken_strings, max_new_tokens=24)
    joint = predictor.transcribe(spoken_strings, max_new_tokens=24)
    assert predictor.transcribe(spoken_strings, max_new_tokens=24) == joint  # deterministic
    assert jiwer.wer(refs, [t or "<empty>" for t in joint]) < jiwer.wer(refs, [t or "<empty>" for t in greedy])
    plain = ModelPredictor(predictor.model, predictor.processor, ctc_weight=0.0)
    assert plain.transcribe(spoken_strings, max_new_tokens=24) == greedy


def test_the_diffusion_variant_reads_with_the_gmm_variants_language_model(digits):
    """Its stage trains only the image head and the image queries: every other weight is the GMM variant's."""
    from safetensors.torch import load_file

    def shared(weights: dict) -> dict:
        return {k: v for k, v in weights.items() if not (k.startswith("heads.image.") or k == "queries.image")}

    gmm, diffusion = (shared(load_file(default_checkpoint(v) / "model.safetensors")) for v in ("gmm", "diffusion"))
    assert gmm.keys() == diffusion.keys()
    assert [k for k in gmm if not torch.equal(gmm[k], diffusion[k])] == []
    model, processor = load_checkpoint(default_checkpoint("diffusion"))
    answers = ModelPredictor(model, processor).complete(_digit_questions(digits), max_new_tokens=6)
    assert sum(answer == str(d) for d, answer in enumerate(answers)) >= 9, answers


def test_the_diffusion_variant_stores_only_its_own_weights():
    from safetensors.torch import load_file

    own = load_file(CHECKPOINTS / "diffusion" / "model.safetensors")
    assert own and all(k.startswith("heads.image.") or k == "queries.image" for k in own), sorted(own)[:5]
    borrowed = json.loads((CHECKPOINTS / "diffusion" / "shared.json").read_text())["borrowed_tensors"]
    merged = load_file(default_checkpoint("diffusion") / "model.safetensors")
    assert merged.keys() == own.keys() | set(borrowed) and not own.keys() & set(borrowed)


def test_a_variant_borrows_the_tensors_its_source_holds_bit_for_bit(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from mllm.default.paths import with_shared_parts
    from mllm.default.ship import drop_equal_tensors

    monkeypatch.setenv("MLLM_CACHE", str(tmp_path / "cache"))
    source, variant = tmp_path / "gmm", tmp_path / "diffusion"
    source.mkdir(), variant.mkdir()
    lm, head = torch.randn(4, 3).half(), torch.randn(2).half()
    save_file({"lm": lm, "heads.image.w": torch.zeros(5).half()}, source / "model.safetensors")
    save_file({"lm": lm.clone(), "heads.image.v": head}, variant / "model.safetensors")
    assert drop_equal_tensors(variant / "model.safetensors", source / "model.safetensors") == ["lm"]
    assert load_file(variant / "model.safetensors").keys() == {"heads.image.v"}
    (variant / "shared.json").write_text(json.dumps({"media_from": "../gmm", "borrowed_tensors": ["lm"]}))
    merged = load_file(with_shared_parts(variant) / "model.safetensors")
    assert merged.keys() == {"lm", "heads.image.v"} and torch.equal(merged["lm"], lm) and torch.equal(merged["heads.image.v"], head)

    (variant / "shared.json").write_text(json.dumps({"media_from": "../gmm", "borrowed_tensors": ["lm", "lm_head"]}))
    (variant / "model.safetensors").touch()  # a new stamp: completed anew
    with pytest.raises(ValueError, match="no tensor lm_head"):
        with_shared_parts(variant)
    assert not [p for p in (tmp_path / "cache" / "default").iterdir() if p.name.startswith(".")]  # nothing half-written
    (variant / "shared.json").write_text(json.dumps({"borrowed_tensors": ["lm"]}))
    with pytest.raises(ValueError, match="media_from"):
        with_shared_parts(variant)


def test_completed_copies_of_a_changed_or_deleted_variant_are_pruned(tmp_path, monkeypatch):
    import os
    import shutil

    from mllm.default.paths import with_shared_parts

    monkeypatch.setenv("MLLM_CACHE", str(tmp_path / "cache"))

    def variant(root: Path) -> Path:
        (root / "gmm").mkdir(parents=True)
        (root / "diffusion").mkdir()
        for name in ("config.json", "model.safetensors"):
            (root / "diffusion" / name).write_text("{}")
        (root / "diffusion" / "shared.json").write_text(json.dumps({"media_from": "../gmm"}))
        return root / "diffusion"

    kept, deleted = variant(tmp_path / "install"), variant(tmp_path / "clone")
    first, clone = with_shared_parts(kept), with_shared_parts(deleted)
    assert with_shared_parts(kept) == first and first.is_dir() and clone.is_dir()
    in_progress = first.parent / ".diffusion-writing"
    in_progress.mkdir()
    os.symlink(kept / "config.json", in_progress / "config.json")
    shutil.rmtree(deleted.parent)
    os.utime(kept / "model.safetensors", ns=(1, 1))  # new weights: completed anew, the old copy superseded
    second = with_shared_parts(kept)
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([second.name, in_progress.name])


def test_ship_can_replace_a_media_tokenizer_of_the_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    from mllm.default.ship import ship

    def weights(directory: Path, value: float) -> Path:
        directory.mkdir(parents=True)
        save_file({"w": torch.full((2,), value)}, directory / "model.safetensors")
        return directory

    checkpoint = tmp_path / "final"
    weights(checkpoint / "media_tokenizers" / "image", 1.0)
    (checkpoint / "config.json").write_text(json.dumps({"_name_or_path": "/build/dir", "x": 1}))
    detokenizers = {"image": weights(tmp_path / "detok", 2.0)}
    out = ship(checkpoint, detokenizers, tmp_path / "gmm", media_tokenizers={"image": weights(tmp_path / "ink", 3.0)})
    assert torch.equal(load_file(out / "media_tokenizers" / "image" / "model.safetensors")["w"], torch.full((2,), 3.0).half())
    assert torch.equal(load_file(out / "detokenizers" / "image" / "model.safetensors")["w"], torch.full((2,), 2.0).half())
    assert json.loads((out / "config.json").read_text()) == {"x": 1}
    with pytest.raises(ValueError, match="no audio media tokenizer to replace"):
        ship(checkpoint, detokenizers, tmp_path / "bad", media_tokenizers={"audio": tmp_path / "ink"})
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.tmp").exists()


def test_a_ship_or_install_that_fails_half_way_leaves_the_checkpoint_that_was_there(tmp_path, monkeypatch):
    import shutil

    from mllm.default import ship as shipping

    checkpoint, installed = tmp_path / "final", tmp_path / "package" / "checkpoint"
    (checkpoint / "gmm").mkdir(parents=True)
    (checkpoint / "gmm" / "config.json").write_text(json.dumps({"x": 2}))
    (installed / "gmm").mkdir(parents=True)
    (installed / "gmm" / "config.json").write_text(json.dumps({"x": 1}))
    copytree = shutil.copytree

    def copy_then_fail(src, dst, *args, **kwargs):
        copytree(src, dst, *args, **kwargs)
        if Path(dst).name.endswith(".tmp"):  # the whole copy, not one of its sub-folders
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(shipping.shutil, "copytree", copy_then_fail)
    for attempt in (lambda: shipping.install(checkpoint, installed), lambda: shipping.ship(checkpoint, {}, installed)):
        with pytest.raises(OSError, match="No space left"):
            attempt()
        assert json.loads((installed / "gmm" / "config.json").read_text()) == {"x": 1}
        assert sorted(p.name for p in installed.parent.iterdir()) == ["checkpoint"]
    monkeypatch.setattr(shipping.shutil, "copytree", copytree)
    shipping.install(checkpoint, installed)
    assert json.loads((installed / "gmm" / "config.json").read_text()) == {"x": 2}
    assert sorted(p.name for p in installed.parent.iterdir()) == ["checkpoint"]


def test_missing_default_model_says_how_to_remake_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="mllm default train"):
        default_checkpoint(root=tmp_path)
    with pytest.raises(ValueError, match="variant"):
        default_checkpoint("vq")


def test_the_cli_uses_the_default_model_without_model(monkeypatch, tmp_path):
    from mllm import cli

    seen = {}
    monkeypatch.setattr("mllm.eval.runner.evaluate", lambda model, *a, **k: seen.setdefault("model", model) and {})
    cli.main(["eval", "--tasks", "pope_proxy", "--out", str(tmp_path)])
    assert Path(seen["model"]) == default_checkpoint()


def test_a_recipe_can_replace_a_head_of_the_checkpoint_it_starts_from(tmp_path):
    from mllm.config import ConfigError
    from mllm.train import load_recipe
    from mllm.train.checkpointing import build_from_recipe

    recipe = ROOT / "finetune" / "recipes" / "default_diffusion_head.yaml"
    cfg = load_recipe(recipe, [f"init_from={default_checkpoint('gmm')}", f"output_dir={tmp_path}"])
    model, _ = build_from_recipe(cfg)
    assert type(model.heads["image"]).__name__ == "DiffusionHead" and model.config.heads["image"]["name"] == "diffusion"
    assert type(model.heads["audio"]).__name__ == "GMMHead"
    with pytest.raises(ConfigError, match="new_heads"):
        load_recipe(ROOT / "finetune" / "recipes" / "default_multimodal.yaml", ["new_heads.image.name=diffusion"])


def test_a_built_variant_directory_that_shares_media_loads_by_path(tmp_path, monkeypatch):
    from mllm import cli

    monkeypatch.setenv("MLLM_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "checkpoint"
    shutil.copytree(CHECKPOINTS, copy)
    seen = {}
    monkeypatch.setattr("mllm.eval.runner.evaluate", lambda model, *a, **k: seen.setdefault("model", model) and {})
    cli.main(["eval", "--model", str(copy / "diffusion"), "--tasks", "pope_proxy", "--out", str(tmp_path / "e")])
    assert (Path(seen["model"]) / "media_tokenizers" / "image" / "media_tokenizer.yaml").is_file()
    assert Pipeline.from_pretrained(seen["model"]).model.config.heads["image"]["name"] == "diffusion"


def test_corpora_leave_out_media_without_a_tokenizer_and_skipped_tasks(tmp_path):
    def record(i: int, task: str, part: dict) -> dict:
        return {"id": f"r{i}", "task": task, "messages": [{"role": "user", "content": [part]},
                                                          {"role": "assistant", "content": "ok"}]}

    text = {"type": "text", "text": "Draw a stamp."}
    rows = [record(0, "image_caption", text), record(1, "image_generation", text),
            record(2, "video_qa", {"type": "video", "path": "v.mp4"})]
    for split in ("train", "validation"):
        (tmp_path / "in" / "stamps").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "stamps" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_corpora(tmp_path / "in", tmp_path / "out", ["stamps"], {"image", "audio"}, 2.4,
                    skip={"stamps": {"image_generation"}})
    kept = [json.loads(line)["task"] for line in (tmp_path / "out" / "stamps" / "train.jsonl").read_text().splitlines()]
    assert kept == ["image_caption"]


def test_corpora_speak_every_known_reply_in_the_house_voice(tmp_path):
    import numpy as np
    import soundfile as sf

    corpus = tmp_path / "in" / "speech"
    (corpus / "media").mkdir(parents=True)
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32)  # 1 s, "another voice"
    for name in ("a", "b", "s"):
        sf.write(corpus / "media" / f"{name}.wav", noise, 16000)

    def record(i: int, task: str, role: str, wav: str, meta: dict) -> dict:
        audio = {"type": "audio", "path": f"media/{wav}.wav"}
        user = [audio] if role == "user" else [{"type": "text", "text": "Say it."}]
        reply = [audio] if role == "assistant" else "ok"
        return {"id": f"r{i}", "task": task, "meta": meta,
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}

    rows = [record(0, "tts", "assistant", "a", {"transcript": "three"}),
            record(1, "tts", "assistant", "b", {"transcript": "three"}),
            record(2, "asr", "user", "a", {"transcript": "three"}),
            record(3, "sound_generation", "assistant", "s", {}),
            record(4, "interleaved", "assistant", "b", {"speech": [{"transcript": "seven"}]})]
    for split in ("train", "validation"):
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_corpora(tmp_path / "in", tmp_path / "out", ["speech"], {"audio"}, 2.4)
    out = [json.loads(line) for line in (tmp_path / "out" / "speech" / "train.jsonl").read_text().splitlines()]
    paths = [Path(r["messages"][1 if r["task"] != "asr" else 0]["content"][0]["path"]) for r in out]

    assert paths[0] == paths[1] and paths[0].name.startswith("voice-")  # one house-voice file per reply text
    assert paths[2] == (corpus / "media" / "a.wav").resolve()  # the user's audio keeps its voice
    assert not paths[3].name.startswith("voice-")  # a sound has no words to re-speak: padded as it is
    assert paths[4].name.startswith("voice-") and paths[4] != paths[0]
    for p in (paths[0], paths[3], paths[4]):
        samples, rate = sf.read(p)
        assert rate == 16000 and len(samples) == 38400, p  # padded to 2.4 s
    spoken, _ = sf.read(paths[0])
    assert np.abs(spoken[:16000] - noise).mean() > 0.1  # re-spoken, not the recording
    assert not list((tmp_path / "out").rglob("*.tmp"))

    prepare_corpora(tmp_path / "in", tmp_path / "kept", ["speech"], {"audio"}, 2.4, voice=None)
    kept = json.loads((tmp_path / "kept" / "speech" / "train.jsonl").read_text().splitlines()[0])
    assert not Path(kept["messages"][1]["content"][0]["path"]).name.startswith("voice-")


def test_corpora_animate_every_video_request_in_the_canonical_layout(tmp_path):
    import numpy as np

    from mllm.data.corpora.digits import load_mnist
    from mllm.data.corpora.video import render_clip
    from mllm.media import Video, load_video, save_video

    corpus = tmp_path / "in" / "video"
    glyph = load_mnist()[3][0]
    save_video(Video(render_clip([glyph], "left", np.random.default_rng(0)), 4.0), corpus / "media" / "c.mp4")
    meta = {"digits": [3], "direction": "left", "source_indices": [0]}
    clip = {"type": "video", "path": "media/c.mp4"}
    rows = [{"id": f"g{i}", "task": "video_generation", "meta": meta,
             "messages": [{"role": "user", "content": [{"type": "text", "text": "Animate the digit 3 going left."}]},
                          {"role": "assistant", "content": [clip]}]} for i in range(2)]
    rows.append({"id": "q", "task": "video_qa", "meta": meta,
                 "messages": [{"role": "user", "content": [clip, {"type": "text", "text": "Which way?"}]},
                              {"role": "assistant", "content": "left"}]})
    for split in ("train", "validation"):
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FileNotFoundError, match="manifest"):
        prepare_corpora(tmp_path / "in", tmp_path / "out", ["video"], {"video"}, 2.4, one_hand=False)
    clips = {"frames": 8, "size": 32, "fps": 4.0, "digit_size": 16}
    (tmp_path / "in" / "manifest.json").write_text(json.dumps({"config": {"video": clips}}))
    with pytest.raises(KeyError, match="no digits config"):
        prepare_corpora(tmp_path / "in", tmp_path / "out", ["video"], {"video"}, 2.4)
    prepare_corpora(tmp_path / "in", tmp_path / "out", ["video"], {"video"}, 2.4, one_hand=False)
    out = [json.loads(line) for line in (tmp_path / "out" / "video" / "train.jsonl").read_text().splitlines()]
    made = [Path(r["messages"][1]["content"][0]["path"]) for r in out[:2]]

    assert made[0] == made[1] and made[0].name.startswith("clip-")  # one file per requested clip
    assert Path(out[2]["messages"][0]["content"][0]["path"]) == (corpus / "media" / "c.mp4").resolve()  # input kept
    canonical = render_clip([glyph], "left", None)
    assert np.array_equal(canonical, render_clip([glyph], "left", None))
    assert np.abs(load_video(made[0]).frames.astype(float) - canonical).mean() < 3  # H.264 is lossy
    rows_lit = canonical[..., 0].max(axis=(0, 2)).nonzero()[0]  # moving left: the digit's rows never change
    assert abs((rows_lit.min() + rows_lit.max()) / 2 - 15.5) <= 2  # the middle lane

    rows[0]["meta"] = {"digits": [3]}
    (corpus / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="'g0'.*source_indices"):
        prepare_corpora(tmp_path / "in", tmp_path / "bad", ["video"], {"video"}, 2.4, one_hand=False)


def test_corpora_draw_and_animate_every_digit_in_the_house_hand(tmp_path):
    import numpy as np

    from mllm.data.corpora.build import Fractions
    from mllm.data.corpora.digits import digit_rgb, load_mnist, split_indices
    from mllm.data.corpora.video import render_clip
    from mllm.default.corpus import house_hand
    from mllm.media import load_image, load_video

    fractions = Fractions()
    hand = house_hand(fractions)
    mnist = load_mnist()
    assert sorted(hand) == list(range(10))
    assert all(hand[d] in split_indices(len(mnist[d]), fractions, "train") for d in hand)
    assert house_hand(fractions, per_class=50)[3] < 50  # a capped train split draws from the images it keeps

    def message(role: str, *parts: dict) -> dict:
        return {"role": role, "content": list(parts)}

    def say(words: str) -> dict:
        return {"type": "text", "text": words}

    image = {"type": "image", "path": "media/train/000000.png"}
    digits = [{"id": f"d{i}", "task": "image_generation", "meta": {"label": 3, "source_index": i},
               "messages": [message("user", say("Draw the digit 3.")), message("assistant", image)]} for i in range(2)]
    digits.append({"id": "q", "task": "image_qa", "meta": {"label": 3, "source_index": 0},
                   "messages": [message("user", image, say("Which digit?")), message("assistant", say("3"))]})
    interleaved = [{"id": "a", "task": "interleaved", "meta": {"digits": [3], "source_indices": [7], "direction": "up"},
                    "messages": [message("user", say("Draw a 3.")), message("assistant", image),
                                 message("user", say("Now make it move up.")),
                                 message("assistant", {"type": "video", "path": "media/train/000000_1.mp4"})]},
                   {"id": "b", "task": "interleaved", "meta": {"digits": [5, 3], "source_indices": [1, 2], "drawn": [3]},
                    "messages": [message("user", image, say("What digit is this?")), message("assistant", say("5")),
                                 message("user", say("Show me a 3.")), message("assistant", image)]}]
    for name, rows in (("digits", digits), ("interleaved", interleaved)):
        (tmp_path / "in" / name).mkdir(parents=True)
        for split in ("train", "validation"):
            (tmp_path / "in" / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"digits": {"fractions": {"train": 0.8, "validation": 0.1, "test": 0.1}, "per_class": None,
                         "image_size": 32},
              "video": {"frames": 8, "size": 32, "fps": 4.0, "digit_size": 16}}
    (tmp_path / "in" / "manifest.json").write_text(json.dumps({"config": config}))
    prepare_corpora(tmp_path / "in", tmp_path / "out", ["digits", "interleaved"], {"image", "video"}, 2.4)

    def paths(name: str) -> list[list[str]]:
        rows = (tmp_path / "out" / name / "validation.jsonl").read_text().splitlines()
        return [[p["path"] for m in json.loads(r)["messages"] if isinstance(m["content"], list)
                 for p in m["content"] if "path" in p] for r in rows]

    drawn, asked = paths("digits"), paths("interleaved")
    assert drawn[0] == drawn[1]  # one image of the digit, whatever the record's own
    assert Path(asked[0][0]).name == Path(drawn[0][0]).name  # the same hand in every corpus
    assert Path(asked[1][1]).name == Path(drawn[0][0]).name  # meta.drawn names the drawing of a reading sample
    assert asked[1][0] == str((tmp_path / "in" / "interleaved" / image["path"]).resolve())
    assert np.array_equal(load_image(drawn[0][0]).pixels, digit_rgb(3, hand[3], 32))  # PNG: lossless
    assert drawn[2] == [str((tmp_path / "in" / "digits" / image["path"]).resolve())]  # what the user shows: kept
    clip = load_video(asked[0][1]).frames.astype(float)
    assert np.abs(clip - render_clip([mnist[3][hand[3]]], "up", None)).mean() < 3  # house glyph, canonical layout
    assert np.abs(clip - render_clip([mnist[3][7]], "up", None)).mean() > 3  # not the record's own digit

    prepare_corpora(tmp_path / "in", tmp_path / "own", ["digits"], {"image"}, 2.4, one_hand=False)
    own = (tmp_path / "own" / "digits" / "train.jsonl").read_text().splitlines()
    assert json.loads(own[0])["messages"][1]["content"][0]["path"].endswith("000000.png")

    digits[0]["meta"] = {"source_index": 0}
    (tmp_path / "in" / "digits" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in digits))
    with pytest.raises(ValueError, match="'d0'.*meta.label"):
        prepare_corpora(tmp_path / "in", tmp_path / "bad", ["digits"], {"image"}, 2.4)


def test_a_transcription_spells_the_last_turns_recording(spoken_strings, predictor):
    """In a conversation about two recordings, the CTC reading (alone, at weight 1) is of the latest one."""
    import jiwer

    pipe = predictor.pipeline
    first, second = spoken_strings[0:32:4], spoken_strings[4:32:4] + spoken_strings[0:1]  # voice 0, texts k and k + 1
    conversations = [a.messages() + [{"role": "assistant", "content": a.answer}] + b.messages()
                     for a, b in zip(first, second)]
    read = pipe.transcribe(conversations, max_new_tokens=24, ctc_weight=1.0)
    to_second = jiwer.wer([b.answer for b in second], [t or "<empty>" for t in read])
    to_first = jiwer.wer([a.answer for a in first], [t or "<empty>" for t in read])
    assert to_second < 0.5 < to_first, (read, to_second, to_first)


def test_a_turn_with_two_recordings_or_none_is_transcribed_greedily(spoken_strings, predictor):
    pipe = predictor.pipeline
    two = [{"role": "user", "content": [{"type": "audio", "path": m.path} for i in spoken_strings[:2] for m in i.media]
            + [{"type": "text", "text": "Transcribe the audio."}]}]
    none = [{"role": "user", "content": "Transcribe the audio."}]
    assert pipe.transcribe([two, none], max_new_tokens=24) == pipe.complete([two, none], max_new_tokens=24)


def test_chat_writes_down_an_attached_recording(spoken_strings, predictor, tmp_path, capsys):
    from mllm.cli import main

    item = spoken_strings[1]
    [expected] = predictor.pipeline.transcribe([item.messages()], max_new_tokens=24)
    code = main(["chat", "--attach", item.media[0].path, "--message", item.question, "--reply", "transcript",
                 "--max-tokens", "24", "--media-dir", str(tmp_path)])
    assert code == 0 and f"mllm> {expected}\n" in capsys.readouterr().out
    assert main(["chat", "--message", item.question, "--reply", "transcript", "--media-dir", str(tmp_path)]) == 2
    assert "reply=transcript writes down one attached recording; this message has 0" in capsys.readouterr().err


def test_the_server_transcribes_like_the_pipeline(spoken_strings, predictor):
    from fastapi.testclient import TestClient

    from mllm.serve.app import create_app

    item = spoken_strings[6]
    [expected] = predictor.pipeline.transcribe([item.messages()])
    with TestClient(create_app(predictor.pipeline, model_name="default")) as client:
        wav = Path(item.media[0].path).read_bytes()
        r = client.post("/v1/audio/transcriptions", data={"model": "default"}, files={"file": ("a.wav", wav, "audio/wav")})
    assert r.status_code == 200 and r.json() == {"text": expected} and expected, r.text


def moving_digit_clip(digits: Path, out: Path) -> Path:
    """A test 4 of the digits corpus moving left, as the video corpus renders a clip."""
    from mllm.data.corpora.video import render_clip
    from mllm.media import Video, load_image, save_video

    records = [json.loads(line) for line in (digits / "digits" / "test.jsonl").read_text().splitlines()]
    four = next(r for r in records if r["meta"]["label"] == 4)["messages"][0]["content"][0]["path"]
    gray = load_image(digits / "digits" / four).pixels.max(axis=2)
    return save_video(Video(render_clip([gray], "left", None), 4.0), out / "four.mp4")


def test_each_example_request_gets_the_kinds_of_reply_it_promises(digits, spoken_strings, tmp_path):
    """What `mllm chat` suggests asking the embedded default, each in a new conversation as it says."""
    import io

    from mllm.chat import ChatSession
    from mllm.default.examples import EXAMPLES, example_medium

    own = {"speech": Path(spoken_strings[0].media[0].path), "video": moving_digit_clip(digits, tmp_path)}
    session = ChatSession(Pipeline.from_pretrained(default_checkpoint()), tmp_path / "media", out=io.StringIO())
    for example in EXAMPLES:
        if example.attach is not None:
            session.attach(example_medium(digits, example) or own[example.test_file[0]])
        reply = session.ask(example.request)
        kinds = tuple(p["type"] for p in reply if p["type"] != "text" or p["text"].strip())
        assert kinds == example.replies, (example.request, reply)
        session.reset()


def test_chat_shows_the_examples_for_the_embedded_default_model(digits, monkeypatch, capsys):
    import io

    import mllm.chat
    from mllm.cli import main
    from mllm.default.examples import EXAMPLES

    shown = []
    monkeypatch.setattr(mllm.chat, "repl", lambda session: shown.append(session.intro) or 0)
    monkeypatch.setenv("MLLM_CACHE", str(digits.parent))
    (digits.parent / "corpora").symlink_to(digits)
    assert main(["chat"]) == 0 and main(["chat", "--model", "default:diffusion"]) == 0
    assert shown[0] == shown[1] and all(e.request in shown[0] for e in EXAMPLES)
    assert f"/attach {digits.parent / 'corpora' / 'digits' / 'media' / 'test'}" in shown[0]  # a built test image
    assert "/attach <a recording of numbers: `mllm data build` makes test files>" in shown[0]
    session = mllm.chat.ChatSession(None, digits, out=io.StringIO(), intro=shown[0])
    session.command("/help")  # shows them again
    assert session.out.getvalue().endswith(f"\n{shown[0]}\n\n")


def test_an_example_that_attaches_numbers_offers_a_recording_of_numbers(tmp_path):
    from mllm.default.examples import EXAMPLES, example_medium

    def asr(k: int, kind: str) -> dict:
        return {"id": f"speech-test-{k:06d}", "task": "asr", "meta": {"kind": kind},
                "messages": [{"role": "user", "content": [{"type": "audio", "path": f"media/test/{k:06d}.wav"}]}]}

    (tmp_path / "speech").mkdir()
    (tmp_path / "speech" / "test.jsonl").write_text("".join(json.dumps(asr(k, kind)) + "\n"
                                                            for k, kind in enumerate(("words", "digits"))))
    numbers = [e for e in EXAMPLES if e.attach == "a recording of numbers"]
    assert len(numbers) == 2
    for example in numbers:
        assert example_medium(tmp_path, example) == tmp_path / "speech" / "media" / "test" / "000001.wav"


def test_the_readme_lists_every_example_request():
    from mllm.default.examples import EXAMPLES

    readme = (ROOT / "README.md").read_text()
    assert all((f"| {e.request} | {e.attach} |" if e.attach else f"| {e.request} | |") in readme for e in EXAMPLES)


def test_the_web_page_offers_the_examples_for_the_embedded_default_model(predictor, monkeypatch):
    from fastapi.testclient import TestClient

    import mllm.serve.app
    from mllm.cli import main
    from mllm.default.examples import EXAMPLES

    served = []
    monkeypatch.setattr(mllm.serve.app, "serve", lambda model, **kwargs: served.append(kwargs["examples"]))
    assert main(["serve"]) == 0 and main(["serve", "--model", str(CHECKPOINTS / "gmm")]) == 0
    assert served == [[e.to_dict() for e in EXAMPLES], []]  # a checkpoint by path: no examples
    with TestClient(mllm.serve.app.create_app(predictor.pipeline, examples=served[0])) as client:
        assert client.get("/examples").json() == {"examples": served[0]}
        assert '<div id="examples" hidden>' in client.get("/").text
    with TestClient(mllm.serve.app.create_app(predictor.pipeline)) as client:
        assert client.get("/examples").json() == {"examples": []}


def test_the_server_says_when_max_tokens_cut_a_reply(predictor):
    """A drawing takes 66 tokens: at 64 the reply is empty and says "length" (the web page's old default gave
    an empty bubble with "stop"); at 256 it is drawn and stops on its own."""
    from fastapi.testclient import TestClient

    from mllm.serve.app import create_app

    pipe = Pipeline.from_pretrained(default_checkpoint())
    request = {"model": "default", "messages": [{"role": "user", "content": "Draw the digit 7."}], "temperature": 0,
               "modalities": ["text", "image", "audio", "video"]}  # the media it may write where it chooses
    with TestClient(create_app(pipe, model_name="default")) as client:
        for max_tokens, finish, kinds in ((64, "length", []), (256, "stop", ["image_url"])):
            [choice] = client.post("/v1/chat/completions", json={**request, "max_tokens": max_tokens}).json()["choices"]
            content = choice["message"]["content"]  # "" when empty, else a list of parts
            media = [p["type"] for p in content if p["type"] != "text"] if content else []
            assert (choice["finish_reason"], media) == (finish, kinds)
