"""Video tokenizers and de-tokenizers: shapes and token counts, determinism, save/load round trips, the
CLIP tower option, bad input, the video judge, and both recipes end to end on a tiny corpus."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml

import mllm.tokenize  # noqa: F401  (registers the video tokenizers, de-tokenizers and recipes)
from mllm.detokenizers import build_detokenizer, list_detokenizers, load_detokenizer
from mllm.judges.video import VideoJudge, centroid_track, direction
from mllm.media import MediaError, Video
from mllm.tokenize import commands
from mllm.tokenize.corpus_media import shuffled_batches
from mllm.tokenize.recipes import list_recipes
from mllm.tokenize.video_recipes import corpus_clips
from mllm.tokenizers import build_media_tokenizer, list_media_tokenizers, load_media_tokenizer

BASE = dict(frames=4, image_size=16, patch_size=4, width=32, heads=2, pool=2, num_tokens=8, feature_dim=8,
            query_grid=[2, 2], resampler_depth=1)
TINY = {
    "video_divot": BASE,
    "video_divot_free": {**BASE, "num_tokens": 6, "query_grid": None},
    "video_divot_conv": {**BASE, "stem": "conv"},  # strided 3×3 convolutions cut the frames' patches
    "video_divot_fsq": {**BASE, "levels": [4, 3, 3]},
}


def videos(n: int, frames: int = 6, size: int = 20, seed: int = 0) -> list[Video]:
    """Random clips of a length and size no tokenizer uses natively (so sampling and resizing are exercised)."""
    rng = np.random.default_rng(seed)
    return [Video(rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8), 4.0) for _ in range(n)]


def tokenizer(key: str):
    torch.manual_seed(0)
    return build_media_tokenizer("video_divot_fsq" if key.endswith("fsq") else "video_divot", TINY[key])


def diffusion(token_grid=(2, 2), num_tokens: int = 8, prior: bool = False):
    torch.manual_seed(0)
    return build_detokenizer("diffusion_video", dict(
        frames=4, image_size=16, fps=4.0, num_tokens=num_tokens, token_dim=8, token_grid=token_grid,
        dit=dict(patch_size=4, width=32, depth=1, head_dim=16),
        diffusion=dict(steps=3, scheduler="ddim", prediction_type="sample") if prior else dict(steps=3),
        prior=dict(patch_size=4, width=32, depth=1, heads=2) if prior else None))


def vq_decoder(tok):
    torch.manual_seed(0)
    decoder = build_detokenizer("vq_video", dict(
        frames=4, image_size=16, num_tokens=tok.config.num_tokens, codebook_size=tok.codebook_size,
        code_dim=tok.code_dim, token_grid=tok.config.query_grid, arch=dict(patch_size=4, width=32, depth=1, heads=2)))
    decoder.set_codebook(tok.codebook)
    return decoder


def test_registries_list_the_video_variants():
    assert {"video_divot", "video_divot_fsq"} <= set(list_media_tokenizers())
    assert {"diffusion_video", "vq_video"} <= set(list_detokenizers())
    assert {"video_divot", "video_fsq"} <= set(list_recipes())


@pytest.mark.parametrize("key", sorted(TINY))
def test_encode_shapes_counts_determinism_and_round_trip(key, tmp_path):
    tok, clips = tokenizer(key), videos(3)
    assert tok.modality == "video"
    tokens = tok.encode(clips[0])
    stacked = tok.encode_batch(clips)
    assert len(tokens) == tok.num_tokens(clips[0]) == TINY[key]["num_tokens"]
    if tok.kind == "discrete":
        assert tokens.dtype == torch.int64 and stacked.shape == (3, 8)
        assert 0 <= int(stacked.min()) and int(stacked.max()) < tok.codebook_size == 36
        assert torch.equal(stacked[0], tokens)
    else:
        assert stacked.shape == (3, tok.num_tokens(clips[0]), 8) and torch.isfinite(stacked).all()
        torch.testing.assert_close(stacked[0], tokens, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tokens.mean(-1), torch.zeros(len(tokens)), atol=1e-5, rtol=0)  # per-token norm
    assert torch.equal(tok.encode_batch(clips), stacked)
    loaded = load_media_tokenizer(tok.save_pretrained(tmp_path / key))
    assert type(loaded) is type(tok) and torch.equal(loaded.encode_batch(clips), stacked)


def test_short_clips_repeat_frames_and_any_size_is_resized():
    tok = tokenizer("video_divot")
    one_frame = videos(1, frames=1, size=40)[0]
    assert tok.encode(one_frame).shape == (8, 8)
    still = Video(np.repeat(one_frame.frames, 4, axis=0), 4.0)  # the same frame four times
    torch.testing.assert_close(tok.encode(one_frame), tok.encode(still))


def test_fsq_codes_decode_directly_and_round_trip(tmp_path):
    tok = tokenizer("video_divot_fsq")
    decoder = vq_decoder(tok)
    codes = tok.encode_batch(videos(2))
    clips = decoder.decode_batch(codes)
    assert len(clips) == 2 and clips[0].frames.shape == (4, 16, 16, 3) and clips[0].fps == 4.0
    loaded = load_detokenizer(decoder.save_pretrained(tmp_path / "dec"))
    assert np.array_equal(loaded.decode(codes[0]).frames, clips[0].frames)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 36\)"):
        decoder.decode(torch.full((8,), 36))
    with pytest.raises(ValueError, match="expected codes"):
        decoder.decode(codes[0][:5])


@pytest.mark.parametrize("token_grid,prior", [((2, 2), False), (None, False), ((2, 2), True)])
def test_diffusion_decodes_whole_clips_with_cfg_and_round_trips(token_grid, prior, tmp_path):
    tok = tokenizer("video_divot" if token_grid else "video_divot_free")
    detok = diffusion(token_grid, tok.config.num_tokens, prior).eval()
    detok.set_null_tokens(tok.encode(Video(np.zeros((4, 16, 16, 3), np.uint8), 4.0)))
    tokens = tok.encode_batch(videos(2))
    clip = detok.decode(tokens[0], guidance=3.0, steps=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(clip, Video) and clip.frames.shape == (4, 16, 16, 3)
    again = detok.decode(tokens[0], guidance=3.0, steps=2, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(clip.frames, again.frames)
    assert len(detok.decode_batch(tokens, steps=1)) == 2
    clips = torch.rand(2, 4, 3, 16, 16)
    prior_rows = []
    if prior:
        detok.prior.register_forward_hook(lambda module, args, out: prior_rows.append(len(out)))
    losses = detok.training_losses(clips, tokens)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    if prior:  # the DiT refines the prior's frames; the prior also learns on its own MSE
        assert set(losses) == {"loss", "diffusion", "prior_mse"} and detok.prior.to_pixels.weight.grad is not None
        assert prior_rows == [2, 1]  # once per clip for both losses, once for the null tokens
    loaded = load_detokenizer(detok.save_pretrained(tmp_path / "detok"))
    assert torch.equal(loaded.null_tokens, detok.null_tokens)
    assert np.array_equal(loaded.decode(tokens[0], guidance=3.0, steps=2, generator=torch.Generator().manual_seed(0)).frames,
                          clip.frames)


def test_tokenizer_reads_a_local_clip_tower_and_is_self_contained(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=8)).save_pretrained(tmp_path / "clip")
    tok = build_media_tokenizer("video_divot", {**BASE, "vision_path": str(tmp_path / "clip")})
    tokens = tok.encode_batch(videos(2))
    assert tokens.shape == (2, 8, 8) and tok.frame_size == 32
    assert not any(p.requires_grad for p in tok.tower.parameters()) and not tok.train().tower.training
    saved = tok.save_pretrained(tmp_path / "saved")
    shutil.rmtree(tmp_path / "clip")  # the saved tokenizer no longer needs the HF directory
    torch.testing.assert_close(load_media_tokenizer(saved).encode_batch(videos(2)), tokens)


def test_bad_input_raises_clear_errors():
    tok, detok = tokenizer("video_divot"), diffusion()
    with pytest.raises(MediaError, match="video is empty"):
        tok.encode(Video(np.zeros((0, 16, 16, 3), np.uint8), 4.0))
    with pytest.raises(MediaError, match="expected a Video"):
        tok.encode(np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="non-empty list"):
        tok.encode_batch([])
    with pytest.raises(ValueError, match="NaN or inf"):
        detok.decode(torch.full((8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"expected tokens \[8, 8\]"):
        detok.decode(torch.zeros(8, 5))
    with pytest.raises(ValueError, match="query_grid"):
        build_media_tokenizer("video_divot", {**BASE, "num_tokens": 9})
    with pytest.raises(ValueError, match="stem must be 'patch' or 'conv'"):
        build_media_tokenizer("video_divot", {**BASE, "stem": "cnn"})
    with pytest.raises(ValueError, match="a prior needs x0-prediction"):
        build_detokenizer("diffusion_video", dict(frames=4, image_size=16, num_tokens=8, token_dim=8,
                                                  token_grid=(2, 2), prior=dict(width=32, depth=1, heads=2)))
    with torch.no_grad():
        tok.resampler.proj_out.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or inf features"):
        tok.encode(videos(1)[0])


def test_batch_streams_sharing_a_cache_load_each_clip_once(tmp_path):
    paths, loads = [tmp_path / f"{i}.mp4" for i in range(6)], []
    load = lambda p: loads.append(p) or p.name  # noqa: E731
    shared: dict = {}
    stage1, stage2 = shuffled_batches(paths, 2, 0, 10, load, shared), shuffled_batches(paths, 3, 1, 10, load, shared)
    batches = [next(stage1) for _ in range(3)] + [next(stage2) for _ in range(4)]
    assert sorted(loads) == sorted(paths) and all(len(set(b)) == len(b) for b in batches)
    capped = shuffled_batches(paths, 3, 0, 2, load, {})
    loads.clear()
    [next(capped) for _ in range(4)]  # two epochs: all but the 2 cached clips load twice
    assert len(loads) == 6 + 4


def moving_square(direction_: str, frames: int = 6) -> Video:
    out = np.zeros((frames, 32, 32, 3), np.uint8)
    for t in range(frames):
        step = 3 * t
        y, x = {"right": (10, step), "left": (10, 20 - step), "down": (step, 10), "up": (20 - step, 10)}[direction_]
        out[t, y:y + 8, x:x + 8] = 255
    return Video(out, 4.0)


@pytest.mark.parametrize("d", ["left", "right", "up", "down"])
def test_direction_is_the_sign_of_the_dominant_centroid_displacement(d):
    clip = moving_square(d)
    assert direction(clip) == d
    assert centroid_track(clip).shape == (6, 2)


# ---------------------------------------------------------------- judge and recipes on a tiny corpus


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from mllm.data.corpora.build import build_corpora

    out = tmp_path_factory.mktemp("corpora")
    build_corpora("data/build_small.yaml", out, only=["digits", "video"], progress=False, overwrite=True)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_video_judge_reads_original_clips(corpora, cache):
    from mllm.media import load_video

    paths, metas = corpus_clips(corpora, "video", "test")
    clips = [load_video(p) for p in paths]
    judge = VideoJudge.load_or_train(corpora, progress=False)
    scores = judge.scores(clips, [m["digits"] for m in metas], [m["direction"] for m in metas])
    assert scores["direction_accuracy"] == 1.0
    assert 0 <= scores["digit_accuracy"] <= 1
    lanes = judge.lane_crops(clips[0])
    assert len(lanes) == len(metas[0]["digits"]) and all(lane for lane in lanes)


def test_the_moving_digits_file_judge_says_digits_then_direction(corpora, cache):
    from mllm.eval.loaders.jsonl import digit_judge
    from mllm.media import load_video

    paths, metas = corpus_clips(corpora, "video", "test")
    paths, metas = paths[:6], metas[:6]
    labels = digit_judge(corpora, "video", motion=True)([str(p) for p in paths] + [str(corpora / "missing.mp4")])
    assert labels[-1] == ""
    judge = VideoJudge.load_or_train(corpora, progress=False)
    for label, path, meta in zip(labels, paths, metas):
        *digits, way = label.split()
        assert way == meta["direction"] and digits == [str(d) for d in judge.digits(load_video(path))]


# each shipped tiny recipe, shrunk to seconds by overrides
SHRINK = ["optim.steps=3", "optim.batch_size=4", "optim.warmup_steps=1", "tokenizer.width=32", "tokenizer.heads=2",
          "evaluation.batch_size=4"]
DIVOT = [*SHRINK, "dit.width=32", "dit.depth=1", "evaluation.steps=2", "pretraining.optim.steps=2",
         "pretraining.optim.batch_size=4", "pretraining.decoder.width=32", "pretraining.decoder.depth=1", "joint=true"]
RECIPES = {
    "video_divot_tiny": DIVOT,
    "video_divot_captioned_tiny": [*DIVOT, "pretraining.min_word_count=1"],
    "video_fsq_tiny": [*SHRINK, "decoder.width=32", "decoder.depth=1"],
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_trains_evaluates_and_reloads(recipe, corpora, cache, tmp_path):
    out = tmp_path / "trained"
    metrics = commands.train(f"tokenizers/{recipe}.yaml", corpora, out, RECIPES[recipe])
    assert metrics["steps"] == (5 if "divot" in recipe else 3) and (out / "loss.png").is_file()
    assert ("final_tokens_caption_words" in metrics) == ("captioned" in recipe)
    report = commands.evaluate(out, corpora, out / "report", limit=4)
    assert (out / "report" / "frame_strips.png").is_file() and (out / "report" / "metrics.json").is_file()
    assert report["clips"] == 4 and report["split"] == "test" and report["psnr_db"] > 0
    assert report["direction_accuracy_originals"] == 1.0 and 0 <= report["direction_accuracy_reconstructions"] <= 1
    assert 0 <= report["digit_accuracy_reconstructions"] <= 1
    held_out = commands.evaluate(out, corpora, out / "validation", limit=2, split="validation")
    assert held_out["split"] == "validation" and held_out["clips"] == 2
    with pytest.raises(ValueError, match="split must be one of test, validation, got 'train'"):
        commands.evaluate(out, corpora, out / "train", split="train")
    tok, detok = load_media_tokenizer(out / "media_tokenizer"), load_detokenizer(out / "detokenizer")
    tokens_file = commands.encode(out / "media_tokenizer", corpus_clips(corpora, "video", "test")[0][:2], tmp_path / "t.safetensors")
    written = commands.decode(out / "detokenizer", tokens_file, tmp_path / "decoded", guidance=2.0, steps=1, seed=0)
    assert len(written) == 2 and all(p.suffix == ".mp4" and p.is_file() for p in written)
    assert tok.modality == detok.modality == "video"


def test_video_ink_invariance_teaches_a_copy_the_teachers_tokens_for_recoloured_clips(corpora, cache, tmp_path):
    teacher, out = tmp_path / "teacher", tmp_path / "ink"
    commands.train("tokenizers/video_divot_tiny.yaml", corpora, teacher, DIVOT)
    with pytest.raises(ValueError, match="teacher in video_ink_invariance: must be a trained video tokenizer directory"):
        commands.train("tokenizers/video_ink_invariance_tiny.yaml", corpora, out, [f"teacher={tmp_path / 'none'}"])
    metrics = commands.train("tokenizers/video_ink_invariance_tiny.yaml", corpora, out, [
        f"teacher={teacher}", "optim.steps=30", "optim.batch_size=8", "optim.warmup_steps=2"])
    assert metrics["steps"] == 30 and (out / "loss.png").is_file()
    report = commands.evaluate(out, corpora, out / "report", limit=4)
    assert report["clips"] == 4
    # the student writes the teacher's tokens of the original for a recoloured clip better than the teacher does
    assert report["token_mse_student_recoloured"] < report["token_mse_teacher_recoloured"]
    assert load_media_tokenizer(out / "media_tokenizer").spec == load_media_tokenizer(teacher / "media_tokenizer").spec
    assert load_detokenizer(out / "detokenizer").modality == "video"

    # `frame` moves each clip the student reads, every frame alike; the report then reads moved recolourings too
    moved = tmp_path / "moved"
    with pytest.raises(ValueError, match="augment"):
        commands.train("tokenizers/video_ink_invariance_tiny.yaml", corpora, moved, [f"teacher={teacher}", "frame.prob=2"])
    with pytest.raises(ValueError, match="augment: retime"):
        commands.train("tokenizers/video_ink_invariance_tiny.yaml", corpora, moved, [f"teacher={teacher}", "tempo.prob=2"])
    commands.train("tokenizers/video_ink_invariance_tiny.yaml", corpora, moved, [
        f"teacher={teacher}", "optim.steps=30", "optim.batch_size=8", "optim.warmup_steps=2", "frame.translate=0.15",
        "frame.scale=[0.7,1.0]", "frame.prob=1.0", "tempo.span=[0.5,0.8]", "tempo.prob=0.5"])
    report = commands.evaluate(moved, corpora, moved / "report", limit=4)
    assert report["token_mse_student_moved"] < report["token_mse_teacher_moved"]
    assert report["token_mse_student_slowed"] > 0 and 0 <= report["direction_accuracy_drawn_from_student_slowed"] <= 1
    assert (moved / "report" / "ink_invariance.png").is_file()  # inputs and what was drawn back, as frame strips
    assert 0 <= report["direction_accuracy_drawn_from_student_moved"] <= 1  # the video judge on them


@pytest.mark.parametrize("options, reason", [
    (dict(fps=0.0), r"finite fps > 0, got 4, 0.0"), (dict(frames=0), r"frames >= 1"),
    (dict(token_grid=[-1, 2], num_tokens=-4), r"num_tokens >= 1"), (dict(token_grid=[4, -2]), r"token_grid \[4, -2\]"),
    (dict(codebook_size=1), r"codebook_size >= 2"), (dict(image_size=30), r"image_size 30 must be a positive multiple"),
])
def test_vq_video_decoder_refuses_a_bad_config_by_file(options, reason, tmp_path):
    from mllm.config import ConfigError

    decoder = vq_decoder(tokenizer("video_divot_fsq"))
    decoder.save_pretrained(tmp_path)
    meta = yaml.safe_load((tmp_path / "detokenizer.yaml").read_text())
    meta["config"].update(options)
    (tmp_path / "detokenizer.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'detokenizer.yaml'}: .*{reason}"):
        load_detokenizer(tmp_path)


def test_video_grids_refuse_sides_below_one_and_a_pool_over_the_patch_grid():
    from mllm.config import ConfigError

    with pytest.raises(ConfigError, match=r"^media tokenizer 'video_divot': query_grid \[4, -2\] makes 16 queries"):
        build_media_tokenizer("video_divot", {**BASE, "num_tokens": 16, "query_grid": [4, -2]})
    with pytest.raises(ConfigError, match=r"^de-tokenizer 'diffusion_video': token_grid \[4, -2\] does not hold num_tokens 16"):
        build_detokenizer("diffusion_video", dict(num_tokens=16, token_grid=[4, -2]))
    with pytest.raises(ConfigError, match=r"^pool: 5 is larger than the 4×4 patch grid"):
        build_media_tokenizer("video_divot", {**BASE, "pool": 5})


@pytest.mark.parametrize("key", ["video_divot", "video_divot_fsq"])
@pytest.mark.parametrize("length", [11, 3])
def test_a_clip_loaded_with_the_tokenizers_options_gives_the_whole_clips_tokens(tmp_path, key, length):
    """load_options keeps only the frames the tokenizer samples: the same tokens, bit for bit, as from every frame."""
    from mllm.media import load_video, save_video

    tok = tokenizer(key)
    path = save_video(videos(1, frames=length, size=24)[0], tmp_path / "clip.mp4")
    whole, sampled = load_video(path), load_video(path, **tok.load_options)
    assert sampled.num_frames == tok.config.frames
    assert torch.equal(tok.encode(sampled), tok.encode(whole))
