"""Image tokenizers and de-tokenizers: shapes and token counts, determinism, save/load round trips,
the CLIP/SigLIP adapter on tiny random HF models, bad input, the digit judge, and each recipe end to end."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mllm.tokenize  # noqa: F401  (registers the image tokenizers, de-tokenizers and recipes)
from mllm.detokenizers import build_detokenizer, list_detokenizers, load_detokenizer
from mllm.judges import DigitJudge, digit_images
from mllm.media import Image, MediaError, load_image, save_image
from mllm.tokenize import commands
from mllm.tokenize.recipes import list_recipes
from mllm.tokenizers import MediaTokenizer, build_media_tokenizer, list_media_tokenizers, load_media_tokenizer

TINY = {
    "fsq_image": dict(image_size=16, patch_size=4, levels=[4, 4, 3], width=32, depth=1, heads=2),
    "query_image": dict(image_size=16, patch_size=4, num_tokens=8, width=32, depth=1, heads=2, codebook_size=64,
                        code_dim=8),
    "resampler_image": dict(image_size=16, patch_size=4, num_tokens=4, feature_dim=16, width=32, depth=1,
                            resampler_depth=1, heads=2),
}
DISCRETE = ["fsq_image", "query_image"]


def images(n: int, size: int = 20, seed: int = 0) -> list[Image]:
    """Random RGB images of a size no tokenizer uses natively (so resizing is exercised)."""
    rng = np.random.default_rng(seed)
    return [Image(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def tokenizer(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_media_tokenizer(name, TINY[name])


def vq_decoder(tok):
    torch.manual_seed(0)
    decoder = build_detokenizer("vq_image", dict(
        image_size=tok.image_size, num_tokens=tok.tokens_per_image, codebook_size=tok.codebook_size,
        code_dim=tok.code_dim, layout=tok.layout, arch=dict(patch_size=4, width=32, depth=1, heads=2)))
    decoder.set_codebook(tok.codebook)
    return decoder


def diffusion(scheduler: str = "flow_matching", backbone: str = "dit", layout: str = "grid"):
    torch.manual_seed(0)
    return build_detokenizer("diffusion_image", dict(
        image_size=16, num_tokens=4, token_dim=16, layout=layout, backbone=backbone,
        dit=dict(patch_size=4, width=32, depth=1, head_dim=16),
        unet=dict(channels=[8, 16], cross_attention=[False, True], head_dim=8, cross_dim=16),
        diffusion=dict(scheduler=scheduler, steps=3)))


def test_registries_list_the_image_variants():
    assert {"fsq_image", "query_image", "resampler_image", "hf_vision"} <= set(list_media_tokenizers())
    assert {"vq_image", "diffusion_image"} <= set(list_detokenizers())
    assert {"image_fsq", "image_query", "image_diffusion"} <= set(list_recipes())


@pytest.mark.parametrize("name", sorted(TINY))
def test_encode_shapes_counts_and_determinism(name):
    tok, batch = tokenizer(name), images(3)
    tokens = tok.encode(batch[0])
    assert len(tokens) == tok.num_tokens(batch[0])
    stacked = tok.encode_batch(batch)
    if tok.kind == "discrete":
        assert tokens.dtype == torch.int64 and stacked.shape == (3, tok.tokens_per_image)
        assert 0 <= int(stacked.min()) and int(stacked.max()) < tok.codebook_size
        assert torch.equal(stacked[0], tokens)
    else:
        assert tokens.dtype == torch.float32 and stacked.shape == (3, tok.num_tokens(batch[0]), tok.feature_dim)
        assert torch.isfinite(stacked).all()
        torch.testing.assert_close(stacked[0], tokens, rtol=1e-4, atol=1e-5)
    assert torch.equal(tok.encode(batch[0]), tokens)  # encoding has no side effects
    assert torch.equal(tokenizer(name).encode(batch[0]), tokens)  # same seed, same tokenizer


@pytest.mark.parametrize("name", sorted(TINY))
def test_tokenizer_save_load_round_trip(name, tmp_path):
    tok, batch = tokenizer(name), images(2)
    saved = tok.save_pretrained(tmp_path / name)
    loaded = load_media_tokenizer(saved)
    assert type(loaded) is type(tok) and loaded.config == tok.config
    assert torch.equal(loaded.encode_batch(batch), tok.encode_batch(batch))
    for cls in (MediaTokenizer, type(tok)):  # HF-style: the family's base class or the variant's own
        assert torch.equal(cls.from_pretrained(saved).encode_batch(batch), tok.encode_batch(batch))
    other = next(c for c in map(type, map(tokenizer, TINY)) if c is not type(tok))
    with pytest.raises(TypeError, match=f"holds a '{tok.name}', not a {other.__name__}"):
        other.from_pretrained(saved)
    with pytest.raises(FileNotFoundError, match="no media_tokenizer.yaml"):
        MediaTokenizer.from_pretrained(tmp_path)


def test_a_conv_stem_cuts_the_same_patches_and_round_trips(tmp_path):
    torch.manual_seed(0)
    tok = build_media_tokenizer("resampler_image", TINY["resampler_image"] | {"stem": "conv"})
    assert [m.stride for m in tok.embed.convs if isinstance(m, torch.nn.Conv2d)] == [(1, 1), (2, 2), (2, 2)]
    batch = images(2)
    assert tok.encode_batch(batch).shape == tokenizer("resampler_image").encode_batch(batch).shape == (2, 4, 16)
    loaded = load_media_tokenizer(tok.save_pretrained(tmp_path / "conv"))
    assert loaded.config.stem == "conv" and torch.equal(loaded.encode_batch(batch), tok.encode_batch(batch))
    with pytest.raises(ValueError, match="stem"):
        build_media_tokenizer("resampler_image", TINY["resampler_image"] | {"stem": "cnn"})
    with pytest.raises(ValueError, match="power-of-2 patch_size"):
        build_media_tokenizer("resampler_image", TINY["resampler_image"] | {"stem": "conv", "patch_size": 3, "image_size": 12})


def test_query_tokens_are_causal():
    tok = tokenizer("query_image")
    pixels = torch.rand(2, 3, 16, 16)
    before = tok.query_features(pixels)
    with torch.no_grad():
        tok.queries[5] += torch.randn(32)  # (a constant shift would vanish in the LayerNorms)
    after = tok.query_features(pixels)
    torch.testing.assert_close(after[:, :5], before[:, :5])  # earlier tokens never see later queries
    assert not torch.allclose(after[:, 5:], before[:, 5:])


@pytest.mark.parametrize("name", DISCRETE)
def test_vq_decoder_decodes_codes_and_round_trips(name, tmp_path):
    tok = tokenizer(name)
    decoder = vq_decoder(tok)
    codes = tok.encode_batch(images(2))
    decoded = decoder.decode_batch(codes)
    assert [d.pixels.shape for d in decoded] == [(16, 16, 3)] * 2
    assert np.array_equal(decoder.decode(codes[0]).pixels, decoded[0].pixels)
    loaded = load_detokenizer(decoder.save_pretrained(tmp_path / "dec"))
    assert torch.equal(loaded.codebook, tok.codebook)
    assert np.array_equal(loaded.decode(codes[1]).pixels, decoded[1].pixels)


@pytest.mark.parametrize("scheduler, backbone, layout",
                         [("flow_matching", "dit", "grid"), ("ddim", "dit", "sequence"), ("ddpm", "unet", "grid")])
def test_diffusion_decode_training_and_round_trip(scheduler, backbone, layout, tmp_path):
    tok, detok = tokenizer("resampler_image"), diffusion(scheduler, backbone, layout)
    detok.set_null_tokens(tok.encode(Image(np.zeros((16, 16, 3), np.uint8))))
    tokens = tok.encode_batch(images(2))
    losses = detok.training_losses(torch.rand(2, 3, 16, 16), tokens)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and any(p.grad is not None for p in detok.denoiser.parameters())

    def decode(module, seed, **kw):
        return module.decode(tokens[0], generator=torch.Generator().manual_seed(seed), **kw).pixels

    first = decode(detok, 0, guidance=3.0, steps=2)
    assert first.shape == (16, 16, 3)
    assert np.array_equal(decode(detok, 0, guidance=3.0, steps=2), first)  # seeded: reproducible
    assert not np.array_equal(decode(detok, 1, guidance=3.0, steps=2), first)
    assert decode(detok, 0).shape == (16, 16, 3)  # default steps and guidance
    loaded = load_detokenizer(detok.save_pretrained(tmp_path / "detok"))
    assert torch.equal(loaded.null_tokens, detok.null_tokens)
    assert np.array_equal(decode(loaded, 0, guidance=3.0, steps=2), first)
    # The guidance a recipe saves in the config is what decode uses when given none.
    detok.config.diffusion.guidance = 3.0
    assert np.array_equal(decode(detok, 0, steps=2), first)
    assert np.array_equal(decode(load_detokenizer(detok.save_pretrained(tmp_path / "guided")), 0, steps=2), first)
    assert not np.array_equal(decode(detok, 0, guidance=1.0, steps=2), first)


# ---------------------------------------------------------------- the CLIP / SigLIP adapter


def tiny_hf_vision(family: str, path, with_processor: bool = False):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    config_cls, model_cls = {"clip": (CLIPVisionConfig, CLIPVisionModel), "siglip": (SiglipVisionConfig, SiglipVisionModel)}[family]
    torch.manual_seed(0)
    model_cls(config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8)).save_pretrained(path)
    if with_processor:
        (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]}))
    return path


@pytest.mark.parametrize("family, query_grid", [("clip", True), ("siglip", False)])
def test_hf_vision_adapter_encodes_and_is_self_contained(family, query_grid, tmp_path):
    source = tiny_hf_vision(family, tmp_path / family, with_processor=family == "clip")
    n = 4 if query_grid else 6
    torch.manual_seed(0)
    tok = build_media_tokenizer("hf_vision", dict(path=str(source), num_tokens=n, query_grid=query_grid, feature_dim=12,
                                                  width=32, depth=1, heads=4))
    tokens = tok.encode_batch(images(2, size=40))
    assert tokens.shape == (2, n, 12) and tok.num_tokens(images(1)[0]) == n and tok.image_size == 32
    assert not any(p.requires_grad for p in tok.encoder.parameters())
    assert all(p.requires_grad for p in tok.resampler.parameters())
    if family == "clip":
        assert tok.config.image_mean == (0.1, 0.2, 0.3)
    saved = tok.save_pretrained(tmp_path / "saved")
    shutil.rmtree(source)  # the saved tokenizer no longer needs the HF directory
    assert torch.equal(load_media_tokenizer(saved).encode_batch(images(2, size=40)), tokens)


def test_hf_vision_refuses_other_models_and_missing_directories(tmp_path):
    from transformers import BertConfig, BertModel

    from mllm.config import ConfigError

    BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=rf"^path: {tmp_path}: model_type 'bert' is not a CLIP or SigLIP"):
        build_media_tokenizer("hf_vision", dict(path=str(tmp_path)))
    with pytest.raises(ConfigError, match=rf"^path: {tmp_path / 'missing'}: no config.json"):
        build_media_tokenizer("hf_vision", dict(path=str(tmp_path / "missing")))
    clip = tiny_hf_vision("clip", tmp_path / "clip")  # 2 layers: hidden states 0 to 2
    for options in (dict(num_tokens=0), dict(feature_dim=0)):  # 0 = 0² passed as a query grid: empty tokens
        with pytest.raises(ConfigError, match=r"need num_tokens and feature_dim >= 1"):
            build_media_tokenizer("hf_vision", dict(path=str(clip), **options))
    for key, name in (("feature_layer", "hf_vision"), ("vision_layer", "video_divot")):
        build_media_tokenizer(name, {"path" if name == "hf_vision" else "vision_path": str(clip), key: -3})
        with pytest.raises(ConfigError, match=rf"^{key}: the tower has 3 hidden states \(-3 to 2\), got 3"):
            build_media_tokenizer(name, {"path" if name == "hf_vision" else "vision_path": str(clip), key: 3})
    (clip / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=rf"^path: {clip}: cannot load the checkpoint"):
        build_media_tokenizer("hf_vision", dict(path=str(clip)))
    (clip / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=rf"^path: {clip}: cannot load the checkpoint"):
        build_media_tokenizer("hf_vision", dict(path=str(clip)))
    with pytest.raises(ConfigError, match=rf"^vision_path: {clip}: cannot load the checkpoint"):
        build_media_tokenizer("video_divot", dict(vision_path=str(clip)))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", sorted(TINY))
def test_tokenizers_refuse_bad_media(name):
    tok = tokenizer(name)
    with pytest.raises(MediaError, match="expected an Image, got str"):
        tok.encode("digit.png")
    with pytest.raises(MediaError, match="got ndarray"):
        tok.encode(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="non-empty list"):
        tok.encode_batch([])
    with pytest.raises(MediaError, match="empty"):
        Image(np.zeros((0, 16, 3), np.uint8))


def test_vq_decoder_refuses_bad_codes():
    tok = tokenizer("fsq_image")
    decoder = vq_decoder(tok)
    codes = tok.encode(images(1)[0])  # [16]
    with pytest.raises(ValueError, match=r"expected codes \[16\], got \[15\]"):
        decoder.decode(codes[:15])
    with pytest.raises(ValueError, match=r"expected codes \[16\], got \[0\]"):
        decoder.decode(codes[:0])
    with pytest.raises(ValueError, match="expected integer codes, got torch.float32"):
        decoder.decode(codes.float())
    with pytest.raises(ValueError, match=r"must lie in \[0, 48\)"):
        decoder.decode(codes + 100)
    with pytest.raises(ValueError, match=r"expected a codebook \[48, 3\]"):
        decoder.set_codebook(torch.zeros(10, 3))


def test_diffusion_refuses_bad_tokens():
    detok = diffusion()
    good = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"expected tokens \[4, 16\], got \[4, 15\]"):
        detok.decode(good[:, :15])
    with pytest.raises(ValueError, match=r"expected tokens \[4, 16\], got \[0, 16\]"):
        detok.decode(good[:0])
    with pytest.raises(ValueError, match="NaN or inf"):
        detok.decode(torch.full((4, 16), float("nan")))
    with pytest.raises(ValueError, match="expected float feature tokens, got torch.int64"):
        detok.decode(torch.zeros(4, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        detok.decode(good, steps=0)
    with pytest.raises(ValueError, match=r"expected tokens \[B >= 1, 4, 16\], got \[0, 4, 16\]"):
        detok.decode_batch(torch.zeros(0, 4, 16))


# ---------------------------------------------------------------- judge and recipes on a tiny corpus


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from mllm.data.corpora.build import build_corpora

    out = tmp_path_factory.mktemp("corpora")
    build_corpora("data/build_small.yaml", out, only=["digits"], progress=False, overwrite=True)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_digit_judge_trains_once_and_predicts_digits(corpora, cache, monkeypatch):
    judge = DigitJudge.load_or_train(corpora, progress=False)
    paths, labels = digit_images(corpora, "test")
    predictions = judge.predict([load_image(p) for p in paths])
    assert len(predictions) == len(labels) and all(p in range(10) for p in predictions)
    assert set(judge.info["accuracy"]) == {"validation", "test"}
    monkeypatch.setattr(DigitJudge, "train_on", lambda *a, **k: pytest.fail("retrained despite a cached judge"))
    again = DigitJudge.load_or_train(corpora, progress=False)
    assert again.info == judge.info and again.predict([load_image(p) for p in paths]) == predictions


# each shipped tiny recipe, shrunk to seconds by overrides
SHRINK = ["optim.steps=3", "optim.batch_size=8", "optim.warmup_steps=1"]
RECIPES = {
    "image_fsq_tiny": [*SHRINK, "tokenizer.width=32", "tokenizer.depth=1", "decoder.width=32", "decoder.depth=1"],
    "image_query_tiny": [*SHRINK, "tokenizer.width=32", "tokenizer.depth=1", "decoder.width=32", "decoder.depth=1",
                         "tokenizer.codebook_size=64"],
    "image_diffusion_tiny": [*SHRINK, "data.corpora=[digits]", "tokenizer.options.width=32", "tokenizer.options.depth=1", "dit.width=32",
                             "dit.depth=1", "evaluation.steps=2", "pretraining.optim.steps=2",
                             "pretraining.optim.batch_size=8", "pretraining.decoder.width=32", "pretraining.decoder.depth=1"],
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_trains_evaluates_and_reloads(recipe, corpora, cache, tmp_path):
    out = tmp_path / "trained"
    metrics = commands.train(f"tokenizers/{recipe}.yaml", corpora, out, RECIPES[recipe])
    assert metrics["steps"] == (5 if "diffusion" in recipe else 3) and (out / "loss.png").is_file()
    report = commands.evaluate(out, corpora, out / "report", limit=10)
    assert (out / "report" / "reconstructions.png").is_file()
    assert report["images"] == 10 and report["split"] == "test" and 0 <= report["judge_accuracy_reconstructions"] <= 1
    assert report["psnr_db"] > 0
    assert ("mean_token_probe_accuracy" in report) == ("diffusion" in recipe)
    tok, detok = load_media_tokenizer(out / "media_tokenizer"), load_detokenizer(out / "detokenizer")
    image = load_image(digit_images(corpora, "test")[0][0])
    assert detok.decode(tok.encode(image), steps=1).pixels.shape[:2] == (32, 32)


def test_caption_vocabulary_targets_the_words_of_each_images_captions(corpora):
    from mllm.tokenize.captions import CaptionVocabulary

    vocabulary = CaptionVocabulary(corpora, ["digits"], "image", min_count=1)
    assert {"zero", "one", "nine"} <= set(vocabulary.words)
    captioned = next(iter(vocabulary.captions))
    target = vocabulary.target(captioned)
    words = {vocabulary.words[i] for i in target.nonzero().flatten().tolist()}
    assert words == {w for text in vocabulary.captions[captioned] for w in re.findall(r"[a-z0-9]+", text.lower())}
    assert target.sum().item() == pytest.approx(1.0)
    assert vocabulary.target(corpora / "no-such.png").sum() == 0
    with pytest.raises(ValueError, match="no caption word"):
        CaptionVocabulary(corpora, ["digits"], "image", min_count=10**9)


def test_bag_of_words_loss_prefers_the_right_words_and_skips_uncaptioned_rows():
    from mllm.losses import bag_of_words_loss

    target = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])  # row 2: no caption
    right = torch.tensor([[5.0, 5.0, -5.0], [9.0, -9.0, 0.0]])
    wrong = torch.tensor([[-5.0, -5.0, 5.0], [-9.0, 9.0, 0.0]])
    assert bag_of_words_loss(right, target).item() == pytest.approx(math.log(2), abs=1e-3)  # the target's entropy
    assert bag_of_words_loss(wrong, target) > 5
    assert bag_of_words_loss(right, torch.zeros(2, 3)) == 0


def test_image_diffusion_recipe_with_caption_words(corpora, cache, tmp_path):
    overrides = [*RECIPES["image_diffusion_tiny"], "pretraining.min_word_count=1"]
    metrics = commands.train("tokenizers/image_diffusion_captioned_tiny.yaml", corpora, tmp_path / "t", overrides)
    assert metrics["final_tokens_caption_words"] > 0 and metrics["final_tokens_mse"] > 0
    assert load_media_tokenizer(tmp_path / "t" / "media_tokenizer").encode(load_image(
        digit_images(corpora, "test")[0][0])).shape == (64, 64)


def test_ink_invariance_teaches_a_copy_the_teachers_tokens_for_recoloured_digits(corpora, cache, tmp_path):
    teacher, out = tmp_path / "teacher", tmp_path / "ink"
    commands.train("tokenizers/image_diffusion_tiny.yaml", corpora, teacher, RECIPES["image_diffusion_tiny"])
    with pytest.raises(ValueError, match="teacher in image_ink_invariance: must be a trained image tokenizer directory"):
        commands.train("tokenizers/image_ink_invariance_tiny.yaml", corpora, out, [f"teacher={tmp_path / 'none'}"])
    metrics = commands.train("tokenizers/image_ink_invariance_tiny.yaml", corpora, out, [
        f"teacher={teacher}", "data.corpora=[digits]", "optim.steps=40", "optim.batch_size=16", "optim.warmup_steps=5"])
    assert metrics["steps"] == 40 and (out / "loss.png").is_file()
    report = commands.evaluate(out, corpora, out / "report", limit=40)
    assert (out / "report" / "ink_invariance.png").is_file() and report["grayscale_images"] == report["images"] > 0
    # the student writes the teacher's tokens of the original for a recoloured digit better than the teacher does
    assert report["token_mse_student_recoloured_grayscale"] < 0.7 * report["token_mse_teacher_recoloured_grayscale"]
    assert 0 <= report["judge_drawn_from_student_recoloured"] <= 1
    assert 0 <= report["digit_probe_student_recoloured"] <= 1
    student, detok = load_media_tokenizer(out / "media_tokenizer"), load_detokenizer(out / "detokenizer")
    assert student.spec == load_media_tokenizer(teacher / "media_tokenizer").spec
    image = load_image(digit_images(corpora, "test")[0][0])
    assert detok.decode(student.encode(image), steps=1).pixels.shape[:2] == (32, 32)

    # `frame` moves the student's inputs too; the report then reads the moved recolourings as well
    moved = tmp_path / "moved"
    with pytest.raises(ValueError, match="augment"):
        commands.train("tokenizers/image_ink_invariance_tiny.yaml", corpora, moved, [f"teacher={teacher}", "frame.translate=0.6"])
    commands.train("tokenizers/image_ink_invariance_tiny.yaml", corpora, moved, [
        f"teacher={teacher}", "data.corpora=[digits]", "optim.steps=5", "optim.batch_size=8", "frame.rotate_degrees=10",
        "frame.translate=0.1"])
    report = commands.evaluate(moved, corpora, moved / "report", limit=20)
    assert report["token_mse_teacher_moved_grayscale"] > 0 and 0 <= report["digit_probe_student_moved"] <= 1


def test_ink_invariance_computes_each_mediums_targets_once_and_reuses_them_exactly():
    from mllm.tokenize.ink_invariance import InkInvariance

    class Counting(torch.nn.Module):  # a frozen tokenizer's stand-in: tokens [B, 2, 3] from pixels [B, 6]
        def __init__(self):
            super().__init__()
            self.proj, self.calls = torch.nn.Linear(6, 6), 0

        def features(self, pixels: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.proj(pixels).reshape(len(pixels), 2, 3)

    torch.manual_seed(0)
    media = torch.randn(4, 6)
    teacher = Counting()
    module = InkInvariance(Counting(), teacher, pixels=lambda batch: torch.stack(batch), perturb=lambda x: x + 1)
    first = module.training_losses(([0, 1], [media[0], media[1]]))["loss"]
    assert teacher.calls == 1 and not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(module.training_losses(([0, 1], [media[0], media[1]]))["loss"], first)
    module.training_losses(([1, 0], [media[1], media[0]]))
    assert teacher.calls == 1  # every target was cached
    module.training_losses(([0, 2], [media[0], media[2]]))  # one new medium: the whole batch goes through again
    assert teacher.calls == 2 and torch.allclose(module.targets[2], teacher.features(media[2:3])[0], atol=1e-6)


def test_encode_command_refuses_two_files_of_one_name(tmp_path):
    build_media_tokenizer("patch", dict(image_size=8, patch_size=4)).save_pretrained(tmp_path / "patch")
    first, second = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    for path, image in zip((first, second), images(2)):
        path.parent.mkdir()
        save_image(image, path)
    with pytest.raises(MediaError, match=r"b/x\.png: has the file name of .*a/x\.png"):
        commands.encode(tmp_path / "patch", [first, second], tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()
    tokens = load_file(commands.encode(tmp_path / "patch", [first, first], tmp_path / "t.safetensors"))
    assert list(tokens) == ["x.png"] and tokens["x.png"].shape == (4, 48)


def test_encode_command_never_leaves_a_half_written_token_file(tmp_path, monkeypatch):
    build_media_tokenizer("patch", dict(image_size=8, patch_size=4)).save_pretrained(tmp_path / "patch")
    save_image(images(1)[0], tmp_path / "x.png")
    out = commands.encode(tmp_path / "patch", [tmp_path / "x.png"], tmp_path / "t.safetensors")
    before = out.read_bytes()

    def killed(tokens, path):  # the write dies halfway
        open(path, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        commands.encode(tmp_path / "patch", [tmp_path / "x.png"], out)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_decode_command_refuses_two_entries_that_decode_to_one_file(tmp_path):
    build_detokenizer("patch", dict(image_size=8, patch_size=4)).save_pretrained(tmp_path / "patch")
    features = torch.zeros(4, 48)
    save_file({"x.png": features, "x.jpg": features.clone()}, tmp_path / "t.safetensors")
    with pytest.raises(MediaError, match=r"t\.safetensors: entries 'x\.jpg' and 'x\.png' would both decode to x\.png"):
        commands.decode(tmp_path / "patch", tmp_path / "t.safetensors", tmp_path / "out", None, None, 0)
    assert not (tmp_path / "out").exists()
    save_file({"x.png": features, "y.jpg": features.clone()}, tmp_path / "t.safetensors")
    written = commands.decode(tmp_path / "patch", tmp_path / "t.safetensors", tmp_path / "out", None, None, 0)
    assert [p.name for p in written] == ["x.png", "y.png"] and load_image(written[1]).pixels.shape == (8, 8, 3)


def test_decode_command_names_the_entry_whose_tokens_do_not_fit(tmp_path):
    # the de-tokenizer's own ValueError named neither the token file nor the entry, and the CLI showed a traceback
    build_detokenizer("patch", dict(image_size=8, patch_size=4)).save_pretrained(tmp_path / "patch")
    save_file({"a.png": torch.zeros(4, 48), "b.png": torch.zeros(3, 48)}, tmp_path / "t.safetensors")
    with pytest.raises(MediaError, match=r"t\.safetensors\['b\.png'\]: .*expected features \[4, 48\], got \(3, 48\)"):
        commands.decode(tmp_path / "patch", tmp_path / "t.safetensors", tmp_path / "out", None, None, 0)


def test_eval_command_names_a_directory_that_train_did_not_write(tmp_path):
    from mllm.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'recipe.yaml'}: cannot read recipe")):
        commands.evaluate(tmp_path, tmp_path, tmp_path / "report")


def test_image_diffusion_trains_without_a_token_pretraining_stage(tmp_path, monkeypatch):
    from mllm.config import from_dict
    from mllm.tokenize import image_recipes

    paths = [tmp_path / f"{i}.png" for i in range(2)]
    for path, image in zip(paths, images(2)):
        save_image(image, path)
    monkeypatch.setattr(image_recipes, "train_images", lambda corpora, data: paths)
    tiny = dict(steps=1, batch_size=2, warmup_steps=1)
    cfg = from_dict(image_recipes.DiffusionRecipeConfig, dict(
        tokenizer=dict(options=TINY["resampler_image"]),
        pretraining=dict(optim=dict(tiny, steps=0), decoder=dict(patch_size=8, width=32, depth=1)), image_size=16,
        dit=dict(patch_size=4, width=32, depth=1, head_dim=16), optim=tiny))
    metrics = image_recipes.train_diffusion(cfg, tmp_path, tmp_path)
    assert metrics["steps"] == 1 and (tmp_path / "detokenizer" / "model.safetensors").is_file()


@pytest.mark.parametrize("override, reason", [
    ("optim.batch_size=0", "batch_size >= 1"), ("optim.steps=-1", "steps >= 0"), ("optim.lr=-0.001", "lr > 0"),
    ("optim.betas=[0.9, 1.5]", "betas in"), ("evaluation.batch_size=0", "batch_size >= 1"),
    ("evaluation.steps=0", "steps >= 1"), ("evaluation.guidance=-2", "guidance must be"),
    ("evaluation.guidance=.nan", "guidance must be"),
])
def test_recipes_refuse_bad_optimiser_and_evaluation_options_by_key(override, reason):
    from mllm.config import ConfigError
    from mllm.tokenize.recipes import load_recipe

    key = override.split(".")[0]
    with pytest.raises(ConfigError, match=rf"^{key} in tokenizers/image_diffusion_tiny\.yaml: .*{re.escape(reason)}"):
        load_recipe("tokenizers/image_diffusion_tiny.yaml", [override])


def test_diffusion_refuses_guidance_and_steps_it_cannot_sample_with():
    from mllm.config import ConfigError

    detok, good = diffusion(), torch.randn(4, 16)
    for guidance in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"diffusion_image: guidance must be a finite number >= 0, got {guidance}"):
            detok.decode(good, guidance=guidance)
    ddim = build_detokenizer("diffusion_image", dict(
        image_size=16, num_tokens=4, token_dim=16, dit=dict(patch_size=4, width=32, depth=1, head_dim=16),
        diffusion=dict(scheduler="ddim", train_timesteps=10, steps=3)))
    with pytest.raises(ValueError, match=r"steps must be >= 1 and <= train_timesteps 10 \(ddim\), got 11"):
        ddim.decode(good, steps=11)
    with pytest.raises(ConfigError, match=r"^diffusion in de-tokenizer 'diffusion_image': steps must be .* got 20"):
        build_detokenizer("diffusion_image", dict(diffusion=dict(scheduler="ddpm", train_timesteps=10, steps=20)))
    with pytest.raises(ConfigError, match="guidance must be a finite number >= 0, got nan"):
        build_detokenizer("diffusion_image", dict(diffusion=dict(guidance=float("nan"))))


def test_ink_invariance_report_draws_back_with_the_evaluation_guidance_and_steps(tmp_path, monkeypatch):
    import yaml

    from mllm.detokenizers.diffusion_image import DiffusionImageDeTokenizer
    from mllm.tokenize import image_recipes, ink_invariance

    teacher, trained = tmp_path / "teacher", tmp_path / "trained"
    for path in (teacher, trained):
        tokenizer("resampler_image").save_pretrained(path / "media_tokenizer")
        diffusion(layout="sequence").save_pretrained(path / "detokenizer")
    (trained / "recipe.yaml").write_text(yaml.safe_dump({"recipe": "image_ink_invariance", "config": {
        "teacher": str(teacher), "data": {"corpora": ["digits"]},
        "evaluation": {"guidance": 2.0, "steps": 1, "batch_size": 4}}}))
    grays = [Image(np.repeat(image.pixels[..., :1], 3, axis=2)) for image in images(4)]
    monkeypatch.setattr(ink_invariance, "eval_set", lambda *a: image_recipes.EvalSet(grays, [0, 1, 2, 3]))
    monkeypatch.setattr(ink_invariance, "digit_reader", lambda *a: lambda tokens: torch.zeros(len(tokens)))
    monkeypatch.setattr(DigitJudge, "load_or_train", lambda *a: type("Judge", (), {"accuracy": lambda *a: 0.5})())
    calls, decode_batch = [], DiffusionImageDeTokenizer.decode_batch
    monkeypatch.setattr(DiffusionImageDeTokenizer, "decode_batch",
                        lambda self, tokens, **kw: calls.append(kw) or decode_batch(self, tokens, **kw))
    report = commands.evaluate(trained, tmp_path, tmp_path / "report")
    assert report["judge_drawn_from_student_recoloured"] == 0.5 and len(calls) == 3
    assert all(kw["guidance"] == 2.0 and kw["steps"] == 1 for kw in calls)


def test_ink_invariance_names_a_missing_or_discrete_teacher(tmp_path):
    from mllm.config import ConfigError

    recipe = "tokenizers/image_ink_invariance_tiny.yaml"
    with pytest.raises(ConfigError, match=r"^teacher in image_ink_invariance: must be a trained image tokenizer"):
        commands.train(recipe, tmp_path, tmp_path / "out", [f"teacher={tmp_path / 'none'}"])
    tok = tokenizer("fsq_image")
    tok.save_pretrained(tmp_path / "fsq" / "media_tokenizer")
    vq_decoder(tok).save_pretrained(tmp_path / "fsq" / "detokenizer")
    with pytest.raises(ConfigError, match=r"^teacher in image_ink_invariance: .*fsq holds a discrete image tokenizer"):
        commands.train(recipe, tmp_path, tmp_path / "out", [f"teacher={tmp_path / 'fsq'}"])


@pytest.mark.parametrize("options, reason", [
    (dict(num_tokens=15), r"a grid of 15 tokens does not match 16 patches of 4²"), (dict(code_dim=0), r"code_dim >= 1"),
    (dict(image_size=18), r"image_size 18 must be a positive multiple of patch_size 4"),
])
def test_vq_image_decoder_refuses_a_bad_config_by_name(options, reason):
    from mllm.config import ConfigError

    good = dict(image_size=16, num_tokens=16, codebook_size=48, code_dim=3, arch=dict(patch_size=4, width=32, depth=1, heads=2))
    build_detokenizer("vq_image", good)
    with pytest.raises(ConfigError, match=rf"^de-tokenizer 'vq_image': .*{reason}"):
        build_detokenizer("vq_image", {**good, **options})


def test_train_command_unmarks_a_previous_run_before_training_again(tmp_path):
    out = tmp_path / "trained"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # a finished earlier run into the same directory
    with pytest.raises(FileNotFoundError, match="no such corpus split"):
        commands.train("tokenizers/image_fsq_tiny.yaml", tmp_path / "no corpora", out)
    assert not (out / "metrics.json").exists() and (out / "recipe.yaml").is_file()


def test_patch_detokenizer_refuses_what_is_not_finite_float_features():
    detok, tok = build_detokenizer("patch", dict(image_size=8, patch_size=4)), build_media_tokenizer("patch", dict(
        image_size=8, patch_size=4))
    image = images(1, size=8)[0]
    features = tok.encode(image)
    assert np.array_equal(detok.decode(features).pixels, image.pixels)
    assert np.array_equal(detok.decode(features * 3).pixels, detok.decode((features * 3).clamp(-1, 1)).pixels)
    for bad, match in ((features.numpy(), "expected float features, got ndarray"),
                       (features.long(), "expected float features, got torch.int64"),
                       (torch.full_like(features, float("nan")), "features contain NaN or inf")):
        with pytest.raises(ValueError, match=f"patch: {match}"):
            detok.decode(bad)
