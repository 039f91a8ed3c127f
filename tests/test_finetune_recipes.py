"""Finetuning recipes: shipped ones validate, DeepSpeed configs fill in, errors name their key before any work;
the schedule, task rates and media encoded ahead."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from mllm import checkpoint
from mllm.checkpoint import build_model, save_checkpoint
from mllm.cli import main as cli
from mllm.config import ConfigError
from mllm.tokenizers import build_media_tokenizer
from mllm.train import finetune, load_recipe
from mllm.train.distributed import DistEnv
from mllm.train.checkpointing import build_from_recipe
from mllm.train.loop import Finetune, cosine_lr
from mllm.train.recipe import deepspeed_config, resolve_precision
from mllm.train.recipe_data import encode_recipe_media
from tests.finetune_setup import ROOT, RECIPES, recipe, write
from tests.finetune_setup import corpus, text_tokenizer  # noqa: F401 (fixtures)


# ---- recipes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_with_its_deepspeed_config(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their DeepSpeed file relative to the repository
    cfg = load_recipe(path)
    if cfg.deepspeed is not None:
        ds = deepspeed_config(cfg, world_size=8, hidden_size=4096)
        assert ds["train_batch_size"] == cfg.data.batch_size * cfg.train.grad_accum * 8
        assert ds["bf16"]["enabled"] == (resolve_precision(cfg.train.precision) == "bf16")
    stage = path.stem.removesuffix("_real")  # every stage comes tiny and at real scale, but the embedded default's:
    if not stage.startswith("default_"):      # they make the tiny shipped model (mllm default train) and nothing else
        assert (path.parent / f"{stage}.yaml").exists() and (path.parent / f"{stage}_real.yaml").exists()


@pytest.mark.parametrize("config", sorted((ROOT / "finetune" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs_fill_every_auto_from_the_recipe(config, corpus, text_tokenizer, tmp_path):
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path, deepspeed=str(config))),
                      ["train.grad_accum=4", "optim.max_grad_norm=0.5", "optim.betas=[0.9, 0.98]"])
    ds = deepspeed_config(cfg, world_size=2, hidden_size=64)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["optimizer"]["params"]["betas"] == [0.9, 0.98]
    assert "auto" not in json.dumps(ds)


@pytest.mark.parametrize("ds, key, got", [
    ([], "deepspeed", "a list"),
    ({"zero_optimization": None}, "zero_optimization", "null"),
    ({"zero_optimization": {"stage": 2}, "optimizer": "AdamW"}, "optimizer", '"AdamW"'),
    ({"zero_optimization": {"stage": 2}, "bf16": None}, "bf16", "null"),
    ({"zero_optimization": {"stage": 2}, "fp16": True}, "fp16", "true"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": []}}, "optimizer.params", "a list"),
])
def test_a_malformed_deepspeed_config_names_the_key_and_file(ds, key, got, corpus, text_tokenizer, tmp_path):
    config = write(tmp_path, ds, "ds.json")
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path, deepspeed=str(config))))
    with pytest.raises(ConfigError, match=f"got {got}") as e:
        deepspeed_config(cfg, world_size=1, hidden_size=8)
    assert e.value.key == key and str(config) in str(e.value)


@pytest.mark.parametrize("overrides, key", [
    (["train.max_stepz=3"], "train.max_stepz"),
    (["train.max_steps=ten"], "train.max_steps"),
    (["init_from=/some/checkpoint"], "model"),
    (["schedule.warmup_steps=100"], "schedule.warmup_steps"),
    (["loss.heads.audio=1.0"], "loss.heads.audio"),
    (["policy.lora.r=0"], "policy.lora"),
    (["optim.betas=[0.9, 1.5]"], "optim.betas"),
    (["train.eval_every=2"], "train.eval_every"),
    (["data.repeat={image_generation: -1}"], "data"),
    (["data.repeat={image_generation: many}"], "data.repeat.image_generation"),
    (["data.repeat_default=-0.5"], "data"),
    (["data.encode_batch={video: 0}"], "data"),
    (["data.encode_batch={video: 2.5}"], "data.encode_batch.video"),
    (["data.encode_batch={video: 2}"], "data.encode_batch.video"),  # the model tokenizes only images
    (["optim.lr=.nan"], "optim.lr"),
    (["optim.eps=.inf"], "optim.eps"),
    (["loss.lm=.nan"], "loss.lm"),
    (["loss.heads.image=.nan"], "loss.heads.image"),
])
def test_recipe_errors_name_the_key(overrides, key, corpus, text_tokenizer, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path)), overrides)
    assert e.value.key == key


def test_an_encode_batch_for_media_an_init_from_model_does_not_tokenize_is_refused(corpus, text_tokenizer, tmp_path):
    """An init_from model's media tokenizers are known once it is loaded: the run checks data.encode_batch then."""
    data = recipe(corpus, text_tokenizer, tmp_path / "out", data={"encode_batch": {"video": 2}})
    del data["model"]
    cfg = load_recipe(write(tmp_path, data | {"init_from": str(tmp_path / "ckpt")}))
    run = SimpleNamespace(cfg=cfg, processor=SimpleNamespace(media_tokenizers={"image": None}))
    with pytest.raises(ConfigError, match=r"tokenizes no video \(it tokenizes: image\)") as e:
        Finetune._encode_media(run)
    assert e.value.key == "data.encode_batch.video"


@pytest.mark.parametrize("problem, key", [
    ({"data": {"train": ["missing.jsonl"]}}, "data.train"),
    ({"deepspeed": "missing.json"}, "deepspeed"),
    ({"deepspeed": {"train_micro_batch_size_per_gpu": 7, "zero_optimization": {"stage": 2}}}, "train_micro_batch_size_per_gpu"),
    ({"deepspeed": {"scheduler": {"type": "WarmupLR"}, "zero_optimization": {"stage": 2}}}, "scheduler"),
    ({"deepspeed": {"zero_optimization": {"stage": 0}}}, "zero_optimization.stage"),
    ({"policy": {"freeze": ["heads.video.*"]}}, "policy.freeze"),
])
def test_recipe_errors_are_found_before_any_work(problem, key, corpus, text_tokenizer, tmp_path):
    if isinstance(problem.get("deepspeed"), dict):
        problem = {"deepspeed": str(write(tmp_path, problem["deepspeed"], "ds.json"))}
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / "out", **problem)))
    with pytest.raises(ConfigError) as e:
        finetune(cfg)
    assert e.value.key == key
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("key", ["data.train", "data.validation"])
def test_empty_record_files_are_named_before_any_work(key, corpus, text_tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    data = {key.split(".")[1]: [str(empty)]}
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / "out", data=data)))
    with pytest.raises(ConfigError, match=f"no records in {empty}: it is empty") as e:
        finetune(cfg)
    assert e.value.key == key


@pytest.mark.parametrize("tasks", [["image_captoin"], ["image_caption", "image_generaton"]])
def test_a_misspelt_task_is_named_before_the_model_is_built(tasks, corpus, text_tokenizer, tmp_path, monkeypatch):
    def never(cfg):
        raise AssertionError("the model was built")

    monkeypatch.setattr("mllm.train.loop.build_from_recipe", never)
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / "out", data={"tasks": tasks})))
    with pytest.raises(ConfigError, match=f"no record has the task {tasks[-1]} "
                                          r"\(the records' tasks: image_caption, image_generation\)") as e:
        finetune(cfg)
    assert e.value.key == "data.tasks"


def test_training_data_of_only_bad_records_says_so(corpus, text_tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "path": "nope.png"}]},
                                            {"role": "assistant", "content": "No."}]}) + "\n")
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / "out", data={"train": [str(bad)]})))
    with pytest.raises(ValueError, match=r"make 0 micro-batches .* data pass: skipped 1 of 1 records \(missing_media 1\)"):
        finetune(cfg)


def test_cosine_schedule_warms_up_then_decays_to_the_floor(corpus, text_tokenizer, tmp_path):
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path)),
                      ["train.max_steps=10", "schedule.warmup_steps=2", "schedule.min_lr_ratio=0.1", "optim.lr=1.0"])
    lrs = [cosine_lr(s, cfg) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 7 / 8)))


def test_data_repeat_up_and_down_samples_tasks_afresh_each_epoch(corpus, text_tokenizer, tmp_path):
    def first_epoch_tasks(data: dict, out: str) -> Counter:
        run = Finetune(load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / out, data=data))),
                       DistEnv.from_environ())
        try:
            return Counter(run.train_records[int(i)]["task"] for i in run.epoch_rows(0))
        finally:
            run.close()

    three_drawings = {"repeat": {"image_generation": 3}}
    assert first_epoch_tasks(three_drawings, "out") == {"image_caption": 24, "image_generation": 72}
    every_other_twice = {"repeat": {"image_generation": 1}, "repeat_default": 2}
    assert first_epoch_tasks(every_other_twice, "rest") == {"image_caption": 48, "image_generation": 24}
    only_drawings = {"repeat": {"image_generation": 1}, "repeat_default": 0}
    assert first_epoch_tasks(only_drawings, "only") == {"image_generation": 24}

    data = {"repeat": {"image_generation": 2.5, "image_caption": 0.25}}
    run = Finetune(load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / "thin", data=data))),
                   DistEnv.from_environ())
    try:
        epochs = [run.epoch_rows(e) for e in range(40)]
        assert np.array_equal(epochs[3], run.epoch_rows(3))  # a resumed run draws the same rows
        tasks = [run.train_records.select(rows)["task"] for rows in epochs]
        captions = [{int(i) for i, t in zip(rows, ts) if t == "image_caption"} for rows, ts in zip(epochs, tasks)]
    finally:
        run.close()
    drawn = Counter(t for ts in tasks for t in ts)
    assert 40 * 24 * 2 < drawn["image_generation"] < 40 * 24 * 3
    assert drawn["image_caption"] == pytest.approx(40 * 24 * 0.25, rel=0.2)
    assert len(set(map(frozenset, captions))) > 30  # a different quarter of the captions each epoch
    assert len(set().union(*captions)) == 24  # and over the epochs, every caption
    with pytest.raises(ConfigError, match="paint") as e:
        finetune(load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / "bad", data={"repeat": {"paint": 2}}))))
    assert e.value.key == "data.repeat"
    with pytest.raises(ConfigError, match="nothing to train on"):
        finetune(load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / "none", data={"repeat_default": 0}))))


def test_media_encoded_ahead_of_a_run_are_found_cached_by_it(corpus, text_tokenizer, tmp_path, capsys):
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / "out")))
    with pytest.raises(ConfigError, match="tokenizes no audio") as e:
        encode_recipe_media(cfg, ["audio"], progress=False)
    assert e.value.key == "model.media"
    stats = encode_recipe_media(cfg, ["image"], progress=False)
    assert (stats.encoded, stats.cached, stats.failed) == (24, 24, 0)  # each image: a caption and a drawing
    assert cli(["finetune", str(tmp_path / "recipe.yaml"), "--modality", "image"]) == 2  # input error's status
    assert "--modality only goes with --encode-only" in capsys.readouterr().err
    assert cli(["finetune", str(tmp_path / "recipe.yaml"), "--encode-only"]) == 0
    assert "token cache: 0 media encoded, 48 already cached, 0 would not load" in capsys.readouterr().out
    # a tokenizer saved in a directory is loaded alone: the audio tokenizer need not be trained yet
    build_media_tokenizer("patch", {"image_size": 16, "patch_size": 8}).save_pretrained(tmp_path / "image_tok")
    saved = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / "saved", model={"media": {
        "image": {"path": str(tmp_path / "image_tok")}, "audio": {"path": str(tmp_path / "not_trained_yet")}}}),
        "saved.yaml"))
    assert encode_recipe_media(saved, ["image"], progress=False).encoded == 24
    with pytest.raises(FileNotFoundError, match="not_trained_yet"):
        encode_recipe_media(saved, progress=False)
    [store] = (tmp_path / "out" / "cache" / "tokens").iterdir()
    run = Finetune(cfg, DistEnv.from_environ())
    try:
        assert run.cache.stores["image"].path == store  # the same tokenizer, so the same directory
        assert sorted(f.name for f in store.glob("shard-*")) == ["shard-00000.safetensors"]  # nothing encoded again
    finally:
        run.close()


def test_a_recipe_that_makes_a_head_parallel_loads_its_checkpoint_with_sdpa(corpus, text_tokenizer, tmp_path,
                                                                            monkeypatch):
    """Flash attention cannot mask a parallel head's block, and "auto" reads the checkpoint's heads: the recipe's
    new_heads count too."""
    data = recipe(corpus, text_tokenizer, tmp_path / "out")
    data["model"]["media"]["image"]["tokens_per_item"] = 4  # a parallel head writes a whole item: N = 4 slots
    save_checkpoint(*build_model(load_recipe(write(tmp_path, data)).model), tmp_path / "ckpt")  # a sequential head
    monkeypatch.setattr(checkpoint, "flash_attention_available", lambda: True)  # as on CUDA with flash-attn
    del data["model"]
    head = {"name": "gmm", "options": {"width": 32, "num_components": 2}, "parallel": True}
    data.update(init_from=str(tmp_path / "ckpt"), new_heads={"image": head})
    model, _ = build_from_recipe(load_recipe(write(tmp_path, data, "parallel.yaml")))
    assert model.is_parallel("image") and model.language_model.config._attn_implementation == "sdpa"
