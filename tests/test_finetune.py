"""Finetuning on CPU with tiny models: recipes, policies, guards, exact resume, crash-safe saves, LoRA merge, export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from mllm.checkpoint import load_checkpoint, save_checkpoint
from mllm.cli import main as cli
from mllm.config import ConfigError
from mllm.model import MultimodalLM
from mllm.plots import save_loss_curves
from mllm.tokenizers import build_media_tokenizer
from mllm.train import apply_policy, finetune, load_recipe, merge, trainable_summary
from mllm.train.checkpointing import (
    TrainerState,
    _save_language_model,
    build_from_recipe,
    complete_checkpoints,
    load_trainable,
    read_state,
    save_step,
    step_dir,
)
from mllm.train.distributed import DistEnv, StepResult
from mllm.train import loop
from mllm.train.loop import Finetune, NonFiniteLossError
from tests.conftest import TINY_LMS
from tests.finetune_setup import ROOT, RECIPES, recipe, write, losses
from tests.finetune_setup import corpus, text_tokenizer, lora_run  # noqa: F401 (fixtures)


# ---- policies -----------------------------------------------------------------------------------


def built(corpus, text_tokenizer, tmp_path, overrides=()):
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path)), list(overrides))
    model, _ = build_from_recipe(cfg)
    return apply_policy(model, cfg.policy), model


def trainable(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}


def test_lora_policy_trains_adapters_new_rows_projectors_and_heads(corpus, text_tokenizer, tmp_path):
    trained, model = built(corpus, text_tokenizer, tmp_path)
    names = trainable(trained)
    assert any(".lora_A." in n for n in names) and all(".lora_" in n or not n.startswith("language_model.model.layers")
                                                        for n in names)
    rows = [n for n in names if "trainable_tokens_delta" in n]
    assert len(rows) == 2  # embedding and (untied) output rows
    new = model.layout.vocab_size - model.layout.text_vocab_size
    assert all(dict(trained.named_parameters())["base_model.model." + n].shape[0] == new for n in rows)
    assert {n.split(".")[0] for n in names} == {"language_model", "projectors", "heads"}
    summary = trainable_summary(trained)
    assert summary.startswith("trainable ") and "lora" in summary and "token rows" in summary and "heads" in summary


def test_full_frozen_and_pattern_policies(corpus, text_tokenizer, tmp_path):
    full, model = built(corpus, text_tokenizer, tmp_path, ["policy.lm=full"])
    assert full is model and all(p.requires_grad for p in model.parameters())
    frozen, _ = built(corpus, text_tokenizer, tmp_path, ["policy.lm=frozen", "policy.heads=false"])
    assert {n.split(".")[0] for n in trainable(frozen)} == {"language_model", "projectors"}
    assert all("trainable_tokens_delta" in n for n in trainable(frozen) if n.startswith("language_model"))
    patterned, _ = built(corpus, text_tokenizer, tmp_path,
                         ["policy.lm=frozen", "policy.new_token_rows=false", "policy.train=['language_model.model.norm.*']",
                          "policy.freeze=['heads.image.*']"])
    assert {n.split(".")[0] for n in trainable(patterned)} == {"projectors", "language_model"}
    assert trainable(patterned) - {n for n in trainable(patterned) if n.startswith("projectors")} == {"language_model.model.norm.weight"}


def test_token_rows_of_a_tied_model_merge_exactly(corpus, text_tokenizer, tmp_path):
    """Qwen2-style tied embeddings: one set of rows serves input and output, before and after merging."""
    trained, model = built(corpus, text_tokenizer, tmp_path,
                           [f"model.base_config={json.dumps(dict(TINY_LMS['qwen2'], vocab_size=320))}"])
    assert len([n for n in trainable(trained) if "trainable_tokens_delta" in n]) == 1
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    ids = torch.tensor([[5, 6, 7] + list(range(model.layout.text_vocab_size, model.layout.vocab_size))])
    ids = ids[:, (ids[0] != model.layout["image"].placeholder_id)]
    trained.eval()
    with torch.no_grad():
        before = trained(input_ids=ids).logits
        after = merge(trained)(input_ids=ids).logits
    assert (before - after).abs().max() < 1e-5


# ---- training, resume, crash safety -------------------------------------------------------------


def test_a_run_writes_checkpoints_metrics_tensorboard_and_a_loss_curve(corpus, text_tokenizer, tmp_path, capsys,
                                                                       monkeypatch):
    curves = []
    monkeypatch.setattr(loop, "save_loss_curves", lambda *args, **kwargs: curves.append(kwargs) or
                        save_loss_curves(*args, **kwargs))
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / "out", data={
        "train": ["generate.jsonl"], "validation": ["understand.jsonl"]}, train={"max_steps": 4, "save_every": 2, "keep_last": 1, "eval_every": 2,
                                                     "eval_batches": 2, "tensorboard": True, "export": "merged",
                                                     "gradient_checkpointing": True})))
    final = finetune(cfg)
    out = tmp_path / "out"
    assert "trainable " in capsys.readouterr().out
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000004"]  # keep_last 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "eval_loss" in rows[1] and "image_loss" in rows[0]
    assert all(np.isfinite(r["loss"]) and not r["skipped"] for r in rows)
    assert list((out / "tensorboard").glob("events.out.tfevents.*")) and (out / "loss.png").stat().st_size > 0
    assert curves[0]["points"] == {"eval_loss": {2: rows[1]["eval_loss"], 4: rows[3]["eval_loss"]}}
    ckpt = complete_checkpoints(out)[-1]
    assert sorted(p.name for p in ckpt.iterdir()) == ["COMPLETE", "model.safetensors", "optimizer", "recipe.yaml",
                                                      "rng", "trainer.json"]
    assert not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(final)
    assert isinstance(model, MultimodalLM)


def test_validation_that_leaves_a_rank_without_a_micro_batch_is_refused_at_setup(corpus, text_tokenizer, tmp_path):
    data = {"train": ["understand.jsonl"], "validation": ["generate.jsonl"], "tasks": ["image_caption"]}
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / "a", data=data,
                                             train={"eval_every": 1})))
    with pytest.raises(ConfigError, match=r"its 0 records \(after data.tasks\) make 0 micro-batches, fewer than the 1 ranks") as e:
        finetune(cfg)  # data.tasks leaves no validation record
    assert e.value.key == "data.validation"
    data = {"train": ["understand.jsonl"], "validation": ["understand.jsonl"], "batch_size": 64}  # one micro-batch
    run = Finetune(load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / "b", data=data,
                                                      train={"eval_every": 1}))), DistEnv())
    try:
        run.env = DistEnv(rank=0, local_rank=0, world_size=2)  # what each of two ranks sees
        with pytest.raises(ConfigError, match="its 24 records .* make 1 micro-batches, fewer than the 2 ranks"):
            run._check_validation()
    finally:
        run.close()


def test_an_evaluation_that_ran_no_micro_batch_is_nan_not_zero(corpus, text_tokenizer, tmp_path, caplog):
    data = {"train": ["understand.jsonl"], "validation": ["understand.jsonl"]}
    run = Finetune(load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / "out", data=data,
                                                      train={"eval_every": 1}))), DistEnv())
    try:
        assert np.isfinite(run.evaluate()["eval_loss"])
        run.validation_records = run.validation_records.select([])
        with caplog.at_level("WARNING"):
            assert all(np.isnan(v) for v in run.evaluate().values())
        assert "no validation micro-batch ran on any rank: eval_loss is NaN" in caplog.text
    finally:
        run.close()


def test_an_evaluation_weighs_tokens_not_micro_batches(corpus, text_tokenizer, tmp_path):
    """The validation set in micro-batches of 2 samples or in one: the same CE per labelled token and head loss
    per target slot, though the micro-batches hold different numbers of them."""
    data = {"train": ["understand.jsonl"], "validation": ["generate.jsonl", "understand.jsonl"], "packing": False}
    results = []
    for batch_size in (2, 64):
        run = Finetune(load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, tmp_path / f"bs{batch_size}",
                                                          data=data | {"batch_size": batch_size},
                                                          train={"eval_every": 1, "eval_batches": 100}))), DistEnv())
        try:
            results.append(run.evaluate())
        finally:
            run.close()
    pairs, whole = results
    assert sorted(whole) == ["eval_image_loss", "eval_lm_loss", "eval_loss"]
    assert pairs == pytest.approx(whole, rel=1e-5)
    assert whole["eval_loss"] == pytest.approx(whole["eval_lm_loss"] + whole["eval_image_loss"], rel=1e-6)


def test_resuming_past_max_steps_is_refused(corpus, text_tokenizer, tmp_path):
    # no step ran, and the export was of the later checkpoint, without a word
    out = tmp_path / "out"
    finetune(load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, out, train={"max_steps": 2, "save_every": 0}))))
    again = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, out, train={"max_steps": 1, "save_every": 0},
                                               schedule={"warmup_steps": 0})))
    with pytest.raises(ConfigError, match=r"train.max_steps.*1, but .*step-00000002 is past it \(step 2\)") as e:
        finetune(again)
    assert e.value.key == "train.max_steps"
    finetune(load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, out, train={"max_steps": 2, "save_every": 0}))))


def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_one(lora_run, corpus, text_tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, out, train={"grad_accum": 2, "tensorboard": True})))
    step = Finetune.step
    calls = []

    def interrupted(self, batches):
        calls.append(1)
        if len(calls) == 5:  # steps 1-4 done, the checkpoint of step 3 written: the machine goes away
            raise KeyboardInterrupt
        return step(self, batches)

    monkeypatch.setattr(Finetune, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg)
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000003"] and len(losses(out)) == 4
    monkeypatch.setattr(Finetune, "step", step)
    finetune(cfg)
    assert losses(out) == losses(lora_run)  # the steps after the resume, bit for bit
    resumed, whole = (load_file(step_dir(o, 6) / "model.safetensors") for o in (out, lora_run))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    for name in ("rank-00000.safetensors", "rank-00000.json"):
        assert (step_dir(out, 6) / "optimizer" / name).read_bytes() == (step_dir(lora_run, 6) / "optimizer" / name).read_bytes()
    events = EventAccumulator(str(out / "tensorboard"))  # both runs' files: the discarded step 4 is purged
    events.Reload()
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [1, 2, 3, 4, 5, 6] and [e.value for e in logged] == pytest.approx(losses(lora_run))


def test_sigterm_finishes_the_step_saves_it_and_the_same_command_resumes(lora_run, corpus, text_tokenizer, tmp_path,
                                                                         monkeypatch, capsys):
    """A scheduler's preemption: the step under way completes and is saved, so no step is lost."""
    import signal

    out = tmp_path / "out"
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, out, train={"grad_accum": 2})))
    step = Finetune.step

    def terminated_during_step_4(self, batches):
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batches)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(Finetune, "step", terminated_during_step_4)
    with pytest.raises(SystemExit) as e:
        finetune(cfg)
    assert e.value.code == 143 and signal.getsignal(signal.SIGTERM) is before
    assert "stopped by SIGTERM after step 4, which is saved" in capsys.readouterr().out
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000003", "step-00000004"] and len(losses(out)) == 4
    assert not (out / "final").exists()  # an unfinished run exports nothing
    monkeypatch.setattr(Finetune, "step", step)
    finetune(cfg)
    assert losses(out) == losses(lora_run)


def test_resume_drops_a_half_written_metrics_line_and_trims_the_file_atomically(tmp_path, monkeypatch, caplog):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    with caplog.at_level("WARNING"):
        Finetune._trim_metrics(SimpleNamespace(out=tmp_path, state=TrainerState(step=2)))
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    assert f"{metrics}:4: dropped a metrics line that does not parse" in caplog.text
    before = metrics.read_text()

    def killed_half_way(self, data, *args, **kwargs):
        with open(self, "w") as f:
            f.write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        Finetune._trim_metrics(SimpleNamespace(out=tmp_path, state=TrainerState(step=1)))
    monkeypatch.undo()
    assert metrics.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints(lora_run):
    with pytest.raises(ConfigError) as e:
        finetune(load_recipe(lora_run.parent / "recipe.yaml", ["train.resume=false"]))
    assert e.value.key == "train.resume"


def test_resuming_with_a_changed_data_stream_warns_that_the_data_position_is_the_old_streams(lora_run, caplog):
    """The position is micro-batch k of the epoch's stream: of another batch size (or seed, records, packing...) it
    names other records, so some come twice this epoch and others not at all."""
    cfg = load_recipe(lora_run.parent / "recipe.yaml", ["data.batch_size=1", "train.seed=3"])
    with caplog.at_level("WARNING", logger="mllm.train.loop"):
        Finetune(cfg, DistEnv()).close()
    [warning] = [r.getMessage() for r in caplog.records if "data stream differs" in r.getMessage()]
    assert "train.seed 0 -> 3; data.batch_size 2 -> 1" in warning and "step-00000006" in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="mllm.train.loop"):
        Finetune(load_recipe(lora_run.parent / "recipe.yaml", ["train.max_steps=8"]), DistEnv()).close()
    assert not [r for r in caplog.records if "data stream differs" in r.getMessage()]


KILL_AT_SAVE = """
import os, sys
from mllm.train import checkpointing, finetune, load_recipe
write_state = checkpointing.write_state
def dying(prefix, state):
    if "step-00000004" in str(prefix):
        os._exit(9)  # killed mid-save: the step's weights are written, its optimizer state is not
    write_state(prefix, state)
checkpointing.write_state = dying
finetune(load_recipe(sys.argv[1]))
"""


def test_a_process_killed_during_a_save_leaves_the_previous_checkpoint_loadable(lora_run, corpus, text_tokenizer, tmp_path):
    out = tmp_path / "out"
    path = write(tmp_path, recipe(corpus, text_tokenizer, out, train={"grad_accum": 2, "save_every": 2}))
    killed = subprocess.run([sys.executable, "-c", KILL_AT_SAVE, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000002"]
    assert (out / "checkpoints" / ".step-00000004.tmp" / "model.safetensors").is_file()  # the half-written one
    exported = tmp_path / "exported"
    assert cli(["export", str(step_dir(out, 2)), "--out", str(exported), "--merge"]) == 0
    load_checkpoint(exported)
    finetune(load_recipe(path))  # resumes from step 2, replaces the half-written save
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000004", "step-00000006"]
    assert not (out / "checkpoints" / ".step-00000004.tmp").exists()
    assert losses(out) == losses(lora_run)


def killed_mid_delete(monkeypatch, marker: str) -> None:
    """shutil.rmtree dies (KeyboardInterrupt) after deleting `marker` from a directory that holds it."""
    rmtree = shutil.rmtree

    def dying(path, *args, **kwargs):
        if (Path(path) / marker).is_file():
            (Path(path) / marker).unlink()
            raise KeyboardInterrupt
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dying)


def test_a_checkpoint_pruned_by_a_killed_process_is_never_listed_without_its_weights(corpus, text_tokenizer,
                                                                                     tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, out, train={"keep_last": 1})))
    engine = SimpleNamespace(shards_optimizer_state=False, trainable_state=lambda: {"w": torch.zeros(2)},
                             optimizer_state=lambda: {"state": {}})
    save_step(engine, DistEnv(), cfg, TrainerState(step=1))
    with monkeypatch.context() as m:
        killed_mid_delete(m, "model.safetensors")
        with pytest.raises(KeyboardInterrupt):
            save_step(engine, DistEnv(), cfg, TrainerState(step=2))  # prunes step 1, killed half-way
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000002"]
    save_step(engine, DistEnv(), cfg, TrainerState(step=3))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]  # the leftover is gone


def test_a_language_model_export_killed_while_replacing_the_old_one_leaves_a_whole_one(tmp_path, monkeypatch):
    def files(version: str) -> SimpleNamespace:
        def save_pretrained(path):
            Path(path).mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "model.safetensors") if version != "tokenizer" else ("tokenizer.json",):
                (Path(path) / name).write_text(version)
        return SimpleNamespace(save_pretrained=save_pretrained)

    def export(version: str) -> None:
        _save_language_model(SimpleNamespace(language_model=files(version)),
                             SimpleNamespace(tokenizer=files("tokenizer")), tmp_path / "final")

    export("v1")
    with monkeypatch.context() as m:
        killed_mid_delete(m, "config.json")
        with pytest.raises(KeyboardInterrupt):
            export("v2")  # killed while it deletes v1
    final = tmp_path / "final"
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (final / "config.json").read_text() == "v2"
    export("v3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"] and (final / "model.safetensors").read_text() == "v3"


def said_half(corpus: Path) -> str:
    """understand.jsonl with every other picture saying its colour (a transcript, for the CTC term); its name."""
    rows = [json.loads(line) for line in (corpus / "understand.jsonl").read_text().splitlines()]
    for r in rows[::2]:
        r["messages"][0]["content"][0]["transcript"] = r["messages"][1]["content"][0]["text"].split()[-1].strip(".")
    (corpus / "said_half.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return "said_half.jsonl"


def test_a_step_weighs_tokens_not_micro_batches(corpus, text_tokenizer, tmp_path):
    """Two samples in one micro-batch, or one in each of two accumulated: the same losses, gradients and weights,
    though the samples hold different numbers of labelled tokens, target slots and transcribed items."""
    data = {"train": [said_half(corpus), "generate.jsonl", "text.jsonl"], "packing": False}
    rows, weights = {}, {}
    for batch_size, accum in ((2, 1), (1, 2)):
        out = tmp_path / f"bs{batch_size}"
        finetune(load_recipe(write(tmp_path, recipe(
            corpus, text_tokenizer, out, data=data | {"batch_size": batch_size}, loss={"lm": 2.0, "transcripts": 0.5},
            policy={"lora": {"r": 4, "dropout": 0.0}}, train={"max_steps": 4, "grad_accum": accum, "save_every": 0}))))
        rows[batch_size] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        weights[batch_size] = load_file(step_dir(out, 4) / "model.safetensors")
    keys = ("loss", "lm_loss", "image_loss", "transcript_loss", "grad_norm")
    assert all(any(key in r for r in rows[2]) for key in keys)
    for one, two in zip(rows[2], rows[1]):
        assert [k for k in keys if k in one] == [k for k in keys if k in two]
        assert [one[k] for k in keys if k in one] == pytest.approx([two[k] for k in keys if k in two], rel=1e-5)
    assert all(torch.allclose(weights[2][k], weights[1][k], rtol=1e-4, atol=1e-6) for k in weights[2])


def test_with_one_micro_batch_a_step_is_the_models_loss_unscaled(corpus, text_tokenizer, tmp_path):
    """One rank and train.grad_accum 1 (the embedded default's recipes): the gradient and logged loss are those
    of CE·loss.lm + Σ λ_m·head_m + loss.transcripts·CTC, bit for bit, as before the token weighting."""
    data = {"train": [said_half(corpus), "generate.jsonl"], "packing": False, "batch_size": 4}
    run = Finetune(load_recipe(write(tmp_path, recipe(
        corpus, text_tokenizer, tmp_path / "out", data=data, loss={"lm": 2.0, "transcripts": 0.5, "heads": {"image": 0.7}},
        policy={"lora": {"r": 4, "dropout": 0.0}}))), DistEnv())
    try:
        _, _, (batch,) = next(run.steps())
        params = {n: p for n, p in run.engine.module.named_parameters() if p.requires_grad}
        grads = []

        def finish_step():
            grads.append({n: p.grad.clone() for n, p in params.items()})
            run.engine.optimizer.zero_grad(set_to_none=True)
            return StepResult(True, 0.0)

        run.engine.finish_step = finish_step
        log = run.step([batch])
        out = run.engine.forward(batch)
        assert out.transcript_loss is not None and out.head_losses
        loss = out.loss + (2.0 - 1.0) * out.lm_loss + 0.5 * out.transcript_loss  # out.loss has CE once, λ·head
        loss.backward()
        assert log["loss"] == loss.item() and log["lm_loss"] == out.lm_loss.item()
        assert all(torch.equal(p.grad, grads[0][n]) for n, p in params.items())
    finally:
        run.close()


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_abort(corpus, text_tokenizer, tmp_path, monkeypatch):
    forward = MultimodalLM.forward
    calls = []

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) in (3, 7, 9):  # micro-batches of steps 2, 4 and 5 (two per step)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MultimodalLM, "forward", poisoned)
    out = tmp_path / "out"
    cfg = load_recipe(write(tmp_path, recipe(corpus, text_tokenizer, out,
                                             train={"grad_accum": 2, "max_bad_steps": 2, "save_every": 3})))
    with pytest.raises(NonFiniteLossError, match=r"2 steps in a row .* step 5 \(epoch 0, micro-batches 8-9\): "
                                                 r"non-finite loss in micro-batch 8"):
        finetune(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, True, False, True, True]
    assert rows[1]["bad_batches"] == [0] and not np.isfinite(rows[1]["grad_norm"])
    adam = read_state(step_dir(out, 3) / "optimizer" / "rank-00000")["state"]
    assert {float(s["step"]) for s in adam.values()} == {2.0}  # three steps, one skipped: two updates


# ---- LoRA merge and export ----------------------------------------------------------------------


def test_lora_save_load_merge_gives_the_same_outputs(lora_run, corpus, tmp_path):
    ckpt = step_dir(lora_run, 6)
    cfg = load_recipe(ckpt / "recipe.yaml")
    model, processor = build_from_recipe(cfg)
    adapted = apply_policy(model, cfg.policy)
    load_trainable(adapted, ckpt)
    saved = load_file(ckpt / "model.safetensors")
    assert all(torch.equal(p, saved[n]) for n, p in adapted.named_parameters() if p.requires_grad)

    assert cli(["export", str(ckpt), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert isinstance(merged, MultimodalLM) and not any("lora" in n for n, _ in merged.named_parameters())
    records = [json.loads(line) for line in (corpus / "understand.jsonl").read_text().splitlines()[:2]]
    records += [json.loads(line) for line in (corpus / "generate.jsonl").read_text().splitlines()[:2]]
    batch = processor([r["messages"] for r in records], base_dir=corpus)
    adapted.eval()
    with torch.no_grad():
        a, b = adapted(**batch.model_inputs()), merged(**batch.model_inputs())
    assert (a.logits - b.logits).abs().max() < 1e-5
    assert abs(a.loss - b.loss) < 1e-5 and (a.head_losses["image"] - b.head_losses["image"]).abs() < 1e-5


def test_export_round_trips_and_refuses_unmerged_lora(lora_run, corpus, tmp_path):
    ckpt = step_dir(lora_run, 6)
    with pytest.raises(ValueError, match="--merge"):
        cli(["export", str(ckpt), "--out", str(tmp_path / "x")])
    cli(["export", str(ckpt), "--out", str(tmp_path / "a"), "--merge"])
    model, processor = load_checkpoint(tmp_path / "a")
    save_checkpoint(model, processor, tmp_path / "b")
    again, processor_b = load_checkpoint(tmp_path / "b")
    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert processor_b.layout == processor.layout
    assert again.config.heads == model.config.heads and "image" in again.config.heads


def test_a_text_tokenizer_with_nothing_to_learn_from_is_a_config_error(corpus, text_tokenizer, tmp_path):
    image = {"type": "image", "path": str(corpus / "media" / "0.png")}
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text(json.dumps({"messages": [{"role": "user", "content": [image]},
                                                {"role": "assistant", "content": [image]}]}) + "\n")
    data = recipe(corpus, text_tokenizer, tmp_path / "out")
    data["model"]["tokenizer"] = str(tmp_path / "tokenizer")
    for records, vocab_size, key, reason in ((str(no_text), 300, "text_tokenizer.records", "no text to learn a vocabulary"),
                                             ("text.jsonl", 5000, "text_tokenizer", "Vocabulary size too high")):
        data["text_tokenizer"] = {"records": [records], "vocab_size": vocab_size}
        run = SimpleNamespace(cfg=load_recipe(write(tmp_path, data)), env=DistEnv(), say=print)
        with pytest.raises(ConfigError, match=reason) as e:
            Finetune._train_text_tokenizer(run)
        assert e.value.key == key and not (tmp_path / "tokenizer").exists()
        assert not list(tmp_path.glob(".tokenizer*"))


def test_stages_chain_text_pretraining_to_alignment_to_lora(corpus, text_tokenizer, tmp_path):
    """A full text-only stage exports its LM; alignment grows the vocabulary on it; LoRA starts from that."""
    text = recipe(corpus, text_tokenizer, tmp_path / "text", policy={"lm": "full"},
                  data={"train": ["text.jsonl"]}, train={"max_steps": 2, "export": "language_model"})
    text["model"]["media"], text["model"]["heads"] = {}, {}
    text["model"]["tokenizer"] = str(tmp_path / "tokenizer")
    text["text_tokenizer"] = {"records": ["text.jsonl", "understand.jsonl"], "vocab_size": 300}
    text["model"]["base_config"]["vocab_size"] = 300
    base = finetune(load_recipe(write(tmp_path, text, "text.yaml")))
    assert (base / "config.json").is_file() and (tmp_path / "tokenizer" / "tokenizer.model").is_file()

    align = recipe(corpus, text_tokenizer, tmp_path / "align", policy={"lm": "frozen", "heads": False},
                   train={"max_steps": 2, "export": "merged"})
    align["model"] = {**align["model"], "base": str(base)}
    del align["model"]["base_config"], align["model"]["tokenizer"]
    aligned = finetune(load_recipe(write(tmp_path, align, "align.yaml")))

    lora = recipe(corpus, text_tokenizer, tmp_path / "lora", train={"max_steps": 2, "export": "merged"})
    del lora["model"]
    lora["init_from"] = str(aligned)
    final = finetune(load_recipe(write(tmp_path, lora, "lora.yaml")))
    model, processor = load_checkpoint(final)
    assert processor.layout.text_vocab_size == 300 and "image" in processor.layout.modalities


# ---- real-scale recipes, shrunk -----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_parts(tmp_path_factory, mistral_tokenizer_dir):
    """Tiny stand-ins for what the real recipes read from local directories."""
    import mllm.tokenizers.hf_codec  # noqa: F401  (registers the codec tokenizer)
    from transformers import AutoConfig, EncodecConfig, EncodecModel

    root = tmp_path_factory.mktemp("parts")
    lm = dict(TINY_LMS["mistral"])
    AutoModelForCausalLM.from_config(AutoConfig.for_model(lm.pop("model_type"), **lm)).save_pretrained(root / "mistral")
    (root / "tokenizer").symlink_to(mistral_tokenizer_dir)
    build_media_tokenizer("patch", {"image_size": 16, "patch_size": 8}).save_pretrained(root / "image_tokenizer")
    torch.manual_seed(0)
    EncodecModel(EncodecConfig(target_bandwidths=[1.5], num_filters=4, hidden_size=16, codebook_size=32,
                               num_lstm_layers=1)).save_pretrained(root / "encodec")
    return root


def shrunk_overrides(path: Path, parts: Path, corpus: Path, out: Path) -> list[str]:
    """The real recipe's sizes and paths shrunk to the tiny stand-ins; everything else as shipped."""
    cfg = yaml.safe_load(path.read_text())
    model = cfg.get("model")
    data = "[text.jsonl]" if model is not None and not model["media"] else "[understand.jsonl, generate.jsonl]"
    o = [f"output_dir={out}", f"data.root={corpus}", f"data.cache_dir={out / 'cache'}", f"data.train={data}",
         f"data.validation={data}", "data.max_length=160", "data.batch_size=2", "train.max_steps=1",
         "train.save_every=0", "train.eval_every=1", "train.eval_batches=1", "train.grad_accum=1",
         "train.tensorboard=false", "train.export=none", "deepspeed=null", "schedule.warmup_steps=0",
         "train.precision=fp32"]
    if model is None:  # a later stage: start from a tiny model built the way the earlier stages build theirs
        return o + [f"init_from={parts / 'init_from'}"]
    # the tokenizer apart: transformers 5 reads a directory whose config says "mistral" with mistral-common
    o += [f"model.base={parts / 'mistral'}", f"model.tokenizer={parts / 'tokenizer'}", "model.dtype=float32",
          "model.max_length=null"]
    for name, media in model["media"].items():
        if "path" in media:
            o.append(f"model.media.{name}.path={parts / 'image_tokenizer'}")
        elif media.get("tokenizer") == "hf_codec":
            o.append(f"model.media.{name}.options.path={parts / 'encodec'}")
        elif media.get("kind") == "continuous":
            o += [f"model.media.{name}.feature_dim=8", f"model.media.{name}.tokens_per_item=4"]
    for name in model.get("heads", {}):
        o += [f"model.heads.{name}.options.width=32", f"model.heads.{name}.options.num_components=2"]
    return o


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem.endswith("_real")], ids=lambda p: p.name)
def test_real_scale_recipe_wires_up_when_shrunk(path, small_parts, corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    if not (small_parts / "init_from").exists():  # what align_real exports, shrunk: later stages start from it
        align = ROOT / "finetune" / "recipes" / "align_real.yaml"
        first = load_recipe(align, shrunk_overrides(align, small_parts, corpus, tmp_path / "first"))
        model, processor = build_from_recipe(first)
        save_checkpoint(model, processor, small_parts / "init_from")
    cfg = load_recipe(path, shrunk_overrides(path, small_parts, corpus, tmp_path / "out"))
    finetune(cfg)
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text())
    assert row["step"] == 1 and np.isfinite(row["loss"]) and np.isfinite(row["eval_loss"])


def test_launch_scripts_are_valid_bash():
    scripts = sorted((ROOT / "finetune" / "launch").glob("*.sh")) + [ROOT / "finetune" / "gpu_check.sh"]
    assert len(scripts) >= 5
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
    assert (ROOT / "finetune" / "launch" / "hostfile.example").is_file()
