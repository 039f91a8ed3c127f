"""The performance suite's machinery (mllm.bench): alternation, the report, and toy-sized sections.

No timing is asserted: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from mllm import cli
from mllm.bench import corpus, generation, memory, models, suite, training
from mllm.bench.options import add_arguments
from mllm.bench.report import Figure, Results, markdown, rate_figure
from mllm.bench.timing import Timing, alternate

TOY = models.llama(64, 1, vocab=300, positions=512)


def test_alternate_rotates_the_order_and_keeps_every_repeat():
    calls = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = alternate(variants, repeats=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {name: len(t.seconds) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_alternate_needs_a_variant_and_a_repeat():
    with pytest.raises(ValueError):
        alternate({}, repeats=1)
    with pytest.raises(ValueError):
        alternate({"a": lambda: None}, repeats=0)


def test_timing_min_median_and_rate():
    t = Timing([4.0, 1.0, 2.0])
    assert (t.min, t.median) == (1.0, 2.0)
    assert t.rate(8) == (4.0, 8.0)


def test_figure_ratio_and_targets():
    f = rate_figure("s", "candidate", "tok/s", 10, Timing([2.0, 1.0, 2.0]), "base", Timing([1.0, 1.0, 1.0]), target=0.9)
    assert (f.value, f.best, f.baseline) == (5.0, 10.0, 10.0)
    assert f.ratio == 0.5 and f.ratio_best == 1.0 and f.met is False
    assert Figure("s", "share", "", 0.96, target=0.95, target_on="value").met is True
    assert Figure("s", "plain", "ms", 3.0).met is None and Figure("s", "plain", "ms", 3.0).ratio is None


def test_results_round_trip_and_schema(tmp_path):
    figures = [Figure("1. a", "x", "tok/s", 2.0, 3.0, "base", 4.0, 5.0, target=0.9, note="because"),
               Figure("2. b", "y", "MiB", 7.0)]
    results = Results({"date": "today", "quick": True, "wall_s": 12.0}, figures)
    json_path, md_path = results.write(tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["schema"] == 1 and data["meta"]["quick"] is True
    assert set(data["figures"][0]) == {"section", "name", "unit", "value", "best", "baseline_name", "baseline",
                                       "baseline_best", "target", "target_on", "note", "ratio", "ratio_best", "met"}
    assert data["figures"][0]["ratio"] == 0.5 and data["figures"][0]["met"] is False
    assert Results.from_dict(data).to_dict() == data
    assert md_path.read_text() == markdown(results)


def test_markdown_lists_every_figure_and_each_missed_target_with_its_reason():
    results = Results({"wall_s": 1.0}, [
        Figure("2. training step", "multimodal step", "tok/s", 80.0, 90.0, "HF LM step", 100.0, 100.0, target=0.9,
               note="profiler: aten::mm +5 ms"),
        Figure("3. packing", "non-pad share, packed", "", 0.97, target=0.95, target_on="value"),
    ])
    text = markdown(results)
    assert "| 2. training step | multimodal step | 80 tok/s | 90 | HF LM step: 100 | 0.80× | 0.90× | ≥ 0.9 **missed** |" in text
    assert "value ≥ 0.95 met" in text
    assert "- 2. training step / multimodal step: 0.80× < 0.9×. profiler: aten::mm +5 ms" in text


def test_multimodal_batch_trains_the_head_and_matches_the_text_batch_shape():
    model = models.multimodal(TOY)
    batch = models.multimodal_batch(model, rows=2, length=96)
    out = model(**batch.model_inputs())
    assert batch.input_ids.shape == models.text_batch(2, 96, 300).input_ids.shape == (2, 96)
    assert set(out.head_losses) == {"video"} and torch.isfinite(out.loss)


def test_training_steps_run_at_toy_size():
    hf, mm, _ = training.steps(TOY, rows=1, length=96)
    times = alternate({"hf": hf, "mm": mm}, repeats=1, warmup=0)
    assert set(times) == {"hf", "mm"}


def test_generation_variants_run_at_toy_size():
    model = models.multimodal(TOY, tokens_per_item=2).eval()
    fns = generation.variants(model, 2, 1)
    assert {"hf text", "text", "text, no cache", "text, batch 8", "diffusion span, 100 steps"} <= set(fns)
    with torch.no_grad():
        for name, fn in fns.items():
            if name not in ("diffusion span, 50 steps", "diffusion span, 100 steps"):  # the same path, 5-10x longer
                fn()


def test_cli_runs_a_section_and_writes_results(tmp_path):
    assert cli.main(["bench", "--quick", "--only", "machine", "--repeats", "1", "--out", str(tmp_path / "b"),
                     "--work", str(tmp_path / "w")]) == 0
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert data["meta"]["errors"] == {} and set(data["meta"]["sections"]) == {"machine"}
    assert [f["section"] for f in data["figures"]] == ["1. machine"]
    assert "| 1. machine |" in (tmp_path / "b" / "results.md").read_text()


@pytest.mark.parametrize("repeats", ["0", "-2", "two"])
def test_repeats_must_be_a_positive_integer(repeats, capsys):
    # 0 used to mean the default (`args.repeats or 5`) and a negative count failed every section
    with pytest.raises(SystemExit) as exit:
        add_arguments(argparse.ArgumentParser()).parse_args(["--repeats", repeats])
    assert exit.value.code == 2 and "--repeats: expected a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("option, make, message", [
    ("--out", lambda p: p.write_text("x"), "is a file, not a folder"),
    ("--work", lambda p: p.write_text("x"), "is a file, not a folder"),
    ("--data", lambda p: p.mkdir(), "no built corpora at"),
    ("--model", lambda p: p.mkdir(), "not a checkpoint directory (no config.json)"),
])
def test_path_options_are_checked_before_any_section_runs(tmp_path, capsys, option, make, message):
    # a wrong --out was found only when writing the results, after the whole run; a wrong --data silently
    # measured data/build_small.yaml instead, and a wrong --model failed the memory section as a bare exit status
    make(tmp_path / "given")
    with pytest.raises(SystemExit) as exit:
        add_arguments(argparse.ArgumentParser()).parse_args([option, str(tmp_path / "given")])
    assert exit.value.code == 2 and f"{option}: " in (err := capsys.readouterr().err) and message in err


def test_a_failed_memory_stage_reports_its_error(tmp_path, monkeypatch):
    # the stage's stderr was captured and dropped: meta.errors said only "returned non-zero exit status 1"
    failed = subprocess.CompletedProcess([], 1, "", "Traceback (most recent call last):\n...\n"
                                         "FileNotFoundError: ckpt: not a checkpoint directory (no config.json)\n")
    monkeypatch.setattr(memory.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match=r"memory stage 'train' on .* exited with status 1: FileNotFoundError: ckpt"):
        memory.measure("train", tmp_path / "ckpt", tmp_path)


def test_corpora_of_an_older_mllm_are_not_measured(tmp_path, monkeypatch):
    # is_complete alone took an older format's build (other records, other fields) as the corpora to read
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format_version": 1, "corpora": {}}))
    built = []
    monkeypatch.setattr(corpus, "build_corpora", lambda config, out, **kw: built.append(out))
    assert corpus.corpora(old, tmp_path / "work") == tmp_path / "work" / "corpora"
    assert built == [tmp_path / "work" / "corpora"]


def test_small_ratios_keep_their_digits():
    # an audio real-time factor (0.003 s/s against real time, 1) printed as "0.00×"
    rtf = Figure("6. tokenizers", "audio codec: encode real-time factor", "s/s", 0.003, 0.0025, "real time", 1.0, 1.0)
    assert "| real time: 1 | 0.003× | 0.0025× |  |" in markdown(Results({"wall_s": 1.0}, [rtf]))


def test_a_failed_results_write_leaves_the_old_results_and_no_temporary_file(tmp_path, monkeypatch):
    Results({"wall_s": 1.0}, [Figure("1. a", "x", "ms", 1.0)]).write(tmp_path)
    before = (tmp_path / "results.json").read_text()

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        Results({"wall_s": 2.0}, [Figure("1. a", "x", "ms", 2.0)]).write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]
    assert (tmp_path / "results.json").read_text() == before


def test_a_section_named_twice_runs_once(tmp_path, monkeypatch):
    # `--only machine machine` ran it twice: its figures twice over, meta.sections holding the second time only
    ran = []
    monkeypatch.setattr(suite, "run_suite", lambda s, sections: ran.append(sections) or Results({"errors": {}}))
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--only", "scale", "machine", "scale", "--out", str(tmp_path / "b"), "--work", str(tmp_path / "w")])
    assert suite.run_from_args(args) == 0 and ran == [["scale", "machine"]]


def test_the_gpu_script_refuses_a_count_below_one_before_any_work():
    # --steps 0 got as far as timing, then raised a bare ValueError from `alternate`
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "bench/gpu.py", "--device", "cpu", "--steps", "0"], cwd=root,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root})
    assert run.returncode == 2 and "argument --steps: expected a positive integer, got 0" in run.stderr
