"""`mllm default train`'s stages: their order, and the tokenizers and text LM trained side by side."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from mllm.cli import main
from mllm.data.corpora.build import FORMAT_VERSION, CorporaError
from mllm.default.build import SIDE_BY_SIDE, Build, DefaultBuildConfig, Stage, side_by_side
from mllm.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def mark_done(path: Path, text: str) -> None:
    import torch

    print(f"{text} on {torch.get_num_threads()} thread(s)")
    path.write_text(str(torch.get_num_threads()))


def fail() -> None:
    raise ValueError("a bad recipe")


def stage(tmp_path: Path, name: str, work=None, needs=()) -> Stage:
    return Stage(name, tmp_path / name, work or partial(mark_done, tmp_path / name, name.upper()), needs)


def mark_done_after(path: Path, needed: Path) -> None:
    assert needed.is_file(), f"{path.name} started before {needed.name} was done"
    mark_done(path, path.name.upper())


def test_stages_run_in_other_processes_on_one_thread_each_after_what_they_need(tmp_path):
    stages = [stage(tmp_path, "a"), stage(tmp_path, "b"), stage(tmp_path, "c"),
              stage(tmp_path, "d", partial(mark_done_after, tmp_path / "d", tmp_path / "a"), needs=("a", "given"))]
    recorded = {}
    times = side_by_side(stages, tmp_path / "logs", record=recorded.update)
    assert set(times) == set("abcd") and all(t >= 0 for t in times.values()) and recorded == times
    assert all((tmp_path / n).read_text() == "1" for n in "abcd")
    log = (tmp_path / "logs" / "d.log").read_text()
    assert "D on 1 thread(s)" in log and "[default] d: 0 s" in log and "A on" not in log


def test_a_failed_stage_names_its_log_stops_what_needs_it_and_the_others_finish(tmp_path):
    stages = [stage(tmp_path, "x", fail), stage(tmp_path, "never", needs=("x",)),
              stage(tmp_path, "nor", needs=("never",)), stage(tmp_path, "c")]
    recorded = {}
    with pytest.raises(RuntimeError, match=r"x failed \(ValueError: a bad recipe\); its output: .*x\.log; "
                                           r"never did not run: it needs x; nor did not run: it needs never"):
        side_by_side(stages, tmp_path / "logs", record=recorded.update)
    assert list(recorded) == ["c"]  # the time of what finished is kept
    assert (tmp_path / "c").is_file() and not (tmp_path / "never").exists() and not (tmp_path / "nor").exists()
    assert "Traceback" in (tmp_path / "logs" / "x.log").read_text()
    assert "ValueError: a bad recipe" not in (tmp_path / "logs" / "c.log").read_text()


def test_stages_that_need_each_other_are_refused(tmp_path):
    with pytest.raises(ValueError, match="stages that need each other: p, q"):
        side_by_side([stage(tmp_path, "p", needs=("q",)), stage(tmp_path, "q", needs=("p",))], tmp_path / "logs")


def start_and_sleep(pid_file: Path) -> None:
    pid_file.write_text(str(os.getpid()))
    time.sleep(600)


SLEEPING_BUILD = """
import sys
from functools import partial
from pathlib import Path
from mllm.default.build import Stage, side_by_side
from tests.test_default_build import start_and_sleep
out = Path(sys.argv[1])
side_by_side([Stage(n, out / n, partial(start_and_sleep, out / f"{n}.pid")) for n in ("a", "b", "c")], out / "logs")
"""


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (an orphan's zombie may wait long for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["SIGTERM to the build", "Ctrl-C (SIGINT to its process group)", "SIGKILL to the build"])
def test_a_build_stopped_by_a_signal_leaves_no_stage_training(how, tmp_path):
    build = subprocess.Popen([sys.executable, "-c", SLEEPING_BUILD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    pid_files = [tmp_path / "a.pid", tmp_path / "b.pid"]
    wait_for(lambda: all(p.is_file() and p.read_text() for p in pid_files), 120, "the two stages never started")
    workers = [int(p.read_text()) for p in pid_files]
    if how.startswith("Ctrl-C"):
        os.killpg(build.pid, signal.SIGINT)
    else:
        build.send_signal(signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGKILL)
    output = build.communicate(timeout=60)[0]
    wait_for(lambda: not any(running(pid) for pid in workers), 30, f"stages still training after {how}")
    assert not (tmp_path / "c.pid").exists()  # no stage started after the signal
    if how.startswith("SIGTERM"):
        assert build.returncode == 143
    if not how.startswith("SIGKILL"):
        assert "ended the running stages: a, b" in output
    assert not [p for p in (tmp_path / "logs").glob("*.log") if "Traceback" in p.read_text()]


def test_stages_in_order_and_given_tokenizers_are_not_trained(tmp_path):
    build = Build(DefaultBuildConfig(corpora=tmp_path / "corpora", out=tmp_path / "out",
                                     tokenizers={"image": tmp_path / "image_tok"}))
    stages = build.stages()
    assert list(stages) == ["audio_tokenizer", "video_tokenizer", "image_ink", "video_ink", "text", "corpora",
                            "image_tokens", "video_tokens", "audio_tokens", "multimodal", "speech", "video",
                            "diffusion"]
    after = {"multimodal", "speech", "video", "diffusion"}
    assert set(SIDE_BY_SIDE) == set(stages) - after | {"image_tokenizer"}
    # every stage a side-by-side stage needs comes before it, so the order also serves one process
    for name in stages:
        assert all(list(stages).index(n) < list(stages).index(name) for n in stages[name].needs if n in stages)
    multimodal = stages["multimodal"].work
    assert f"model.media.image.path={tmp_path / 'image_tok' / 'media_tokenizer'}" in multimodal.args[2]
    assert f"model.media.video.path={tmp_path / 'out' / 'tokenizers' / 'video' / 'media_tokenizer'}" in multimodal.args[2]
    assert f"init_from={tmp_path / 'out' / 'multimodal' / 'final'}" in stages["speech"].work.args[2]
    assert f"init_from={tmp_path / 'out' / 'speech_head' / 'final'}" in stages["video"].work.args[2]
    assert f"init_from={tmp_path / 'out' / 'video_head' / 'final'}" in stages["diffusion"].work.args[2]
    # the ink stage teaches a copy of the tokenizer the LM trained on (the given one): its tokens are the targets
    assert stages["image_ink"].work.args[2] == tmp_path / "out" / "tokenizers" / "image_ink"
    assert stages["image_ink"].work.args[3] == [f"teacher={tmp_path / 'image_tok'}"]
    assert stages["video_ink"].work.args[3] == [f"teacher={tmp_path / 'out' / 'tokenizers' / 'video'}"]
    # the ink stages learn from their teachers, the multimodal stage's media are encoded by the tokenizers it loads
    assert stages["image_ink"].needs == ("image_tokenizer",) and stages["video_ink"].needs == ("video_tokenizer",)
    assert stages["image_tokens"].needs == ("image_tokenizer", "corpora")
    assert stages["image_tokens"].work.args[:2] == ("image", multimodal.args[2])
    assert stages["audio_tokens"].needs == ("audio_tokenizer", "corpora")
    assert stages["audio_tokens"].work.args[:2] == ("audio", multimodal.args[2])


def test_missing_or_older_corpora_are_refused_before_any_stage_with_what_to_run(tmp_path, capsys):
    corpora, out = tmp_path / "corpora", tmp_path / "out"
    assert main(["default", "train", "--data", str(corpora), "--out", str(out)]) == 2
    said = capsys.readouterr()
    assert f"mllm default train: no built corpora at {corpora}: run `mllm data build` first" in said.err
    assert said.out == "" and not out.exists()
    corpora.mkdir()
    (corpora / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION - 1}))
    older = f"the corpora at {corpora} were built by an older mllm: rebuild them with `mllm data build --overwrite`"
    for command in (["default", "train"], ["demo"]):
        assert main([*command, "--data", str(corpora), "--out", str(tmp_path / command[0])]) == 2
        assert f"mllm {' '.join(command)}: {older}" in capsys.readouterr().err
    build = Build(DefaultBuildConfig(corpora=corpora, out=out))
    with pytest.raises(CorporaError, match="built by an older mllm"):
        build.run()
    assert not out.exists()  # refused before any stage started
    for done in (s.done for s in build.stages().values()):  # a finished build reads no corpora: nothing to refuse
        done.parent.mkdir(parents=True, exist_ok=True)
        done.touch()
    build.check_corpora()


def test_an_override_of_no_stage_or_a_tokenizer_of_no_modality_is_refused_before_any_work(tmp_path, capsys):
    corpora, out = tmp_path / "corpora", tmp_path / "out"
    for extra, said in ((["multimodl:train.max_steps=1"], "overrides for 'multimodl': no such stage (stages: "),
                        (["train.max_steps=1"], "overrides for 'train.max_steps=1': no such stage"),
                        (["--tokenizer", f"imgae={tmp_path}"], "a given tokenizer for 'imgae': no such modality")):
        assert main(["default", "train", "--data", str(corpora), "--out", str(out), *extra]) == 2
        assert f"mllm default train: {said}" in capsys.readouterr().err
    assert not out.exists()
    given = Build(DefaultBuildConfig(corpora=corpora, out=out, tokenizers={"image": tmp_path},
                                     overrides={"multimodal": ["train.max_steps=1"], "audio_tokenizer": ["steps=1"]}))
    with pytest.raises(InputError, match="'image_tokenizer': no such stage"):  # the given tokenizer is not trained
        Build(DefaultBuildConfig(corpora=corpora, out=out, tokenizers=given.cfg.tokenizers,
                                 overrides={"image_tokenizer": ["steps=1"]}))
