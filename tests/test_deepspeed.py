"""DeepSpeed on CPU: two ranks under `deepspeed --num_gpus 2` train like one process, with ZeRO-2 and ZeRO-3.

The first launch JIT-compiles DeepSpeed's shared-memory communication op (about 30 s on two cores) into
this run's own TORCH_EXTENSIONS_DIR: a build killed half-way leaves a `lock` file behind, and every later
load anywhere that directory is shared waits on it forever. The shipped configs are used as they are, plus
`"torch_adam": true`, so no fused-Adam op is compiled.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mllm.tokenizers.text import train_text_tokenizer
from mllm.train import finetune, load_recipe
from mllm.train.checkpointing import complete_checkpoints, step_dir
from mllm.train.distributed import SHM_DIR, STALE_LOCK_S, DistEnv, refuse_stale_build_locks, release_shared_memory_names
from tests.finetune_setup import losses, recipe, write, write_corpus

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The corpus, a recipe (10 steps, checkpoints at 5 and 10) and its single-process run: 2 micro-batches a step."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.fail("deepspeed is not installed: pip install 'deepspeed>=0.15,<1' (mllm's `train` extra)")
    tmp = tmp_path_factory.mktemp("deepspeed")
    write_corpus(tmp / "corpus")
    texts = [json.loads(line)["text"] for line in (tmp / "corpus" / "text.jsonl").read_text().splitlines()]
    tokenizer = train_text_tokenizer(texts * 20 + ["It is red. What colour is this? Paint something blue."] * 20,
                                     tmp / "tokenizer", vocab_size=320)
    base = recipe(tmp / "corpus", tokenizer, tmp / "single", policy={"lora": {"r": 4, "dropout": 0.0}},
                  train={"max_steps": STEPS, "save_every": 5, "grad_accum": 2})
    path = write(tmp, base)
    finetune(load_recipe(path))
    return {"tmp": tmp, "recipe": path, "extensions": tmp_path_factory.mktemp("torch_extensions")}


def launch(setup: dict, stage: int, out: Path, *overrides: str, during: Callable[[int], None] = lambda port: None,
           returncode: int = 0) -> None:
    """`deepspeed --num_gpus 2` (two CPU ranks): one micro-batch a step on each, with the shipped ZeRO config.
    `during(port)` runs while the ranks train."""
    ds = json.loads((ROOT / "finetune" / "deepspeed" / f"zero{stage}.json").read_text())
    ds["optimizer"]["params"]["torch_adam"] = True
    config = write(setup["tmp"], ds, f"zero{stage}.json")
    port = free_port()
    command = ["deepspeed", "--no_local_rank", "--num_gpus", "2", "--master_port", str(port),
               "--module", "mllm.cli", "finetune", str(setup["recipe"]), f"output_dir={out}",
               f"deepspeed={config}", "train.grad_accum=1", *overrides]
    env = os.environ | {"TORCH_EXTENSIONS_DIR": str(setup["extensions"])}
    # Its own session, so that a timeout kills the ranks too, not only the launcher above them.
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        try:
            during(port)
            output, _ = proc.communicate(timeout=300)
        except (subprocess.TimeoutExpired, AssertionError):
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"two ranks killed, the run went wrong:\n{output[-3000:]}")
    assert proc.returncode == returncode, output[-6000:]
    left = sorted(p.name for p in SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"the run left its all-reduce buffers in RAM: {left}"


def rank_pid(port: int, rank: int) -> int:
    """The process of `rank` among the ranks that rendezvous at `port`."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = dict(v.split("=", 1) for v in environ.read_text().split("\0") if "=" in v)
        except OSError:
            continue
        if env.get("MASTER_PORT") == str(port) and env.get("RANK") == str(rank):
            return int(environ.parent.name)
    raise AssertionError(f"no rank {rank} at port {port}")


def trainable_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(step_dir(out, STEPS) / "model.safetensors")


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_process(stage, setup):
    out = setup["tmp"] / f"zero{stage}"
    launch(setup, stage, out)
    one, two = losses(setup["tmp"] / "single"), losses(out)
    assert len(two) == STEPS and max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    single, sharded = trainable_weights(setup["tmp"] / "single"), trainable_weights(out)
    assert single.keys() == sharded.keys()
    assert max((single[k] - sharded[k]).abs().max().item() for k in single) < 1e-4
    parts = sorted(p.name for p in (step_dir(out, STEPS) / "optimizer").iterdir())
    assert parts == ["rank-00000.json", "rank-00000.safetensors", "rank-00001.json", "rank-00001.safetensors"]


def test_two_ranks_weigh_tokens_and_record_what_either_transcribed(setup):
    """Two ranks of one sample each train like one process with both samples in one micro-batch, though the samples
    hold different numbers of labelled tokens and target slots; and a modality transcribed only in rank 1's
    micro-batches is recorded in the checkpoint (rank 0 writes it)."""
    corpus = setup["tmp"] / "corpus"
    said = [json.loads(line) for line in (corpus / "understand.jsonl").read_text().splitlines()]
    records = len(said) + len((corpus / "generate.jsonl").read_text().splitlines())
    order = np.random.default_rng([0, 0]).permutation(records)  # epoch 0's stream: micro-batch i goes to rank i % 2
    first = next(i for p, i in enumerate(order[:6]) if p % 2 and i < len(said))  # an image question rank 1 trains on
    said[first]["messages"][0]["content"][0]["transcript"] = "red"
    (corpus / "said_once.jsonl").write_text("".join(json.dumps(r) + "\n" for r in said))
    overrides = ["data.train=[said_once.jsonl, generate.jsonl]", "data.packing=false", "loss.transcripts=0.5",
                 "train.max_steps=3", "train.save_every=0", "train.grad_accum=1"]
    one = setup["tmp"] / "one_batch_of_two"
    finetune(load_recipe(setup["recipe"], [*overrides, "data.batch_size=2", f"output_dir={one}"]))
    two = setup["tmp"] / "two_ranks_of_one"
    launch(setup, 2, two, *overrides, "data.batch_size=1")
    for out in (one, two):
        assert json.loads((step_dir(out, 3) / "trainer.json").read_text())["transcribed"] == ["image"]
    keys = ("loss", "lm_loss", "image_loss", "transcript_loss", "grad_norm")
    rows = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] for out in (one, two)]
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(*rows):
        assert [k for k in keys if k in a] == [k for k in keys if k in b]
        assert [b[k] for k in keys if k in b] == pytest.approx([a[k] for k in keys if k in a], rel=1e-5)
    weights = [load_file(step_dir(out, 3) / "model.safetensors") for out in (one, two)]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-4


def test_a_sigterm_to_one_rank_stops_both_after_the_same_step_and_saves_it(setup):
    """A preemption that reaches one rank only: the step's all-reduce tells the other, both save that step."""
    out = setup["tmp"] / "preempted"
    metrics = out / "metrics.jsonl"

    def terminate_rank_1_after_step_3(port: int) -> None:
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline, "the ranks never reached step 3"
            time.sleep(0.05)
        os.kill(rank_pid(port, 1), signal.SIGTERM)

    launch(setup, 2, out, "train.max_steps=100000", "train.save_every=0", during=terminate_rank_1_after_step_3,
           returncode=143)
    steps = len(losses(out))
    assert 3 <= steps < 100000 and [p.name for p in complete_checkpoints(out)] == [step_dir(out, steps).name]
    parts = sorted(p.name for p in (step_dir(out, steps) / "optimizer").iterdir())
    assert parts == ["rank-00000.json", "rank-00000.safetensors", "rank-00001.json", "rank-00001.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_resume_exactly(stage, setup):
    """Stop after step 5 (its checkpoint complete), resume on two ranks: the same losses and weights, bit for bit."""
    whole = setup["tmp"] / f"zero{stage}"
    if not step_dir(whole, STEPS).exists():
        launch(setup, stage, whole)
    out = setup["tmp"] / f"zero{stage}_resumed"
    shutil.copytree(whole, out)
    shutil.rmtree(step_dir(out, STEPS))
    launch(setup, stage, out)
    assert losses(out) == losses(whole)
    resumed, uninterrupted = trainable_weights(out), trainable_weights(whole)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_a_lock_left_by_a_killed_build_is_named_not_waited_on(tmp_path):
    """torch waits for ever on `<op>/lock`; a fresh one is a build in progress, an old one a killed build."""
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    refuse_stale_build_locks(tmp_path)
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.raises(RuntimeError, match=r"deepspeed_shm_comm/lock is 3\d min old"):
        refuse_stale_build_locks(tmp_path)


def test_each_rank_unlinks_only_its_own_all_reduce_buffer_name(tmp_path, monkeypatch):
    """DeepSpeed names a rank's buffer by uid, master address and port, and rank; the other job's stays."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    names = [f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}" for port in (29500, 29501)
             for rank in (0, 1)]
    for name in names:
        (tmp_path / name).touch()
    release_shared_memory_names(DistEnv(rank=0, local_rank=0, world_size=1), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
