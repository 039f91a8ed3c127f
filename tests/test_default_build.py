"""`mllm default train`'s stages: their order, and the tokenizers and text LM trained side by side."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest

from mllm.default.build import LANES, Build, DefaultBuildConfig, Stage, side_by_side


def mark_done(path: Path, text: str) -> None:
    import torch

    print(f"{text} on {torch.get_num_threads()} thread(s)")
    path.write_text(str(torch.get_num_threads()))


def fail() -> None:
    raise ValueError("a bad recipe")


def stage(tmp_path: Path, name: str, work=None) -> Stage:
    return Stage(name, tmp_path / name, work or partial(mark_done, tmp_path / name, name.upper()))


def test_lanes_run_in_their_own_processes_on_one_thread_each(tmp_path):
    times = side_by_side([[stage(tmp_path, "a"), stage(tmp_path, "b")], [stage(tmp_path, "c")]], tmp_path / "logs")
    assert set(times) == {"a", "b", "c"} and all(t >= 0 for t in times.values())
    assert all((tmp_path / n).read_text() == "1" for n in "abc")
    log = (tmp_path / "logs" / "a+b.log").read_text()
    assert "A on 1 thread(s)" in log and "B on 1 thread(s)" in log and "[default] b: 0 s" in log


def test_a_failed_lane_names_its_log_and_the_other_lane_finishes(tmp_path):
    with pytest.raises(RuntimeError, match=r"x failed \(ValueError: a bad recipe\); its output: .*x\+never\.log"):
        side_by_side([[stage(tmp_path, "x", fail), stage(tmp_path, "never")], [stage(tmp_path, "c")]], tmp_path / "logs")
    assert (tmp_path / "c").is_file() and not (tmp_path / "never").exists()
    assert "Traceback" in (tmp_path / "logs" / "x+never.log").read_text()
    assert "ValueError: a bad recipe" not in (tmp_path / "logs" / "c.log").read_text()


def test_stages_in_order_and_given_tokenizers_are_not_trained(tmp_path):
    build = Build(DefaultBuildConfig(corpora=tmp_path / "corpora", out=tmp_path / "out",
                                     tokenizers={"image": tmp_path / "image_tok"}))
    stages = build.stages()
    assert list(stages) == ["audio_tokenizer", "video_tokenizer", "image_ink", "video_ink", "text", "corpora",
                            "multimodal", "speech", "video", "diffusion"]
    after = {"multimodal", "speech", "video", "diffusion"}
    assert {n for lane in LANES for n in lane} == set(stages) - after | {"image_tokenizer"}
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
    # in a lane, each ink stage comes after its teacher
    for lane in LANES:
        for m in ("image", "video"):
            if f"{m}_ink" in lane:
                assert lane.index(f"{m}_tokenizer") < lane.index(f"{m}_ink")
