"""The pictures of mllm.plots: what their axes show."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from mllm import plots


def test_loss_curves_below_zero_are_drawn_on_a_linear_axis(tmp_path, monkeypatch):
    # a log axis left out every value <= 0: a GMM head's NLL (finetune's instruct_generate ends at -0.12)
    scales = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: scales.append(fig.axes[0].get_yscale()) or save(fig, path))
    plots.save_loss_curves({"loss": [3.7, 1.0, -0.12], "lm_loss": [math.nan, 1.0, 0.65]}, tmp_path / "a.png")
    plots.save_loss_curves({"loss": [3.7, 1.0, 0.12], "lm_loss": [math.nan, 1.0, 0.65]}, tmp_path / "b.png")
    assert scales == ["linear", "log"] and (tmp_path / "a.png").stat().st_size > 0


def test_a_failed_save_keeps_the_old_picture_and_no_partial_file(tmp_path, monkeypatch):
    # savefig wrote straight into the path: a run killed mid-write left a truncated PNG
    plots.save_loss_curves({"loss": [2.0, 1.0]}, tmp_path / "loss.png")
    before = (tmp_path / "loss.png").read_bytes()

    def killed(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", killed)
    with pytest.raises(KeyboardInterrupt):
        plots.save_loss_curves({"loss": [3.0, 1.0]}, tmp_path / "loss.png")
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"] and (tmp_path / "loss.png").read_bytes() == before


def test_series_measured_at_some_steps_are_drawn_at_those_steps(tmp_path, monkeypatch):
    drawn = {}
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.update(
        {line.get_label(): line.get_xydata().tolist() for line in fig.axes[0].get_lines()}) or save(fig, path))
    plots.save_loss_curves({"loss": [3.0, 2.0, 1.5, 1.2]}, tmp_path / "loss.png", points={"eval_loss": {4: 1.4, 2: 2.2}})
    assert drawn == {"loss": [[1, 3.0], [2, 2.0], [3, 1.5], [4, 1.2]], "eval_loss": [[2, 2.2], [4, 1.4]]}
