"""Pictures people would rather look at than read: loss curves, image grids, frame strips, spectrograms.

Matplotlib's object API (no pyplot): safe in threads and servers, no display needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from mllm.files import atomic_write
from mllm.media import Audio, Image, Video


def save_loss_curves(
    history: dict[str, list[float]],
    path: str | os.PathLike,
    title: str = "training",
    points: dict[str, dict[int, float]] | None = None,
) -> Path:
    """One line per named series (e.g. {"loss": [...], "recon": [...]}) against the step, and the series measured
    only at some steps (e.g. {"eval_loss": {500: 2.1, 1000: 1.8}}) as dots joined by dashes; log scale unless a
    value is zero or negative (a GMM head's NLL goes below zero), which a log axis would silently leave out."""
    points = points or {}
    fig = Figure(figsize=(6.4, 3.6), layout="tight")
    ax = fig.add_subplot()
    for name, values in history.items():
        ax.plot(np.arange(1, len(values) + 1), values, lw=1, label=name)
    for name, measured in points.items():
        steps = sorted(measured)
        ax.plot(steps, [measured[s] for s in steps], "o--", lw=1, ms=3, label=name)
    ys = np.asarray([v for values in history.values() for v in values]
                    + [v for measured in points.values() for v in measured.values()], dtype=float)
    ax.set(xlabel="step", ylabel="value", title=title, yscale="log" if (ys[np.isfinite(ys)] > 0).all() else "linear")
    if len(history) + len(points) > 1:
        ax.legend()
    return _save(fig, path)


def save_image_grid(
    rows: list[list[Image]], path: str | os.PathLike, row_titles: list[str] | None = None, scale: float = 1.0
) -> Path:
    """Images in a grid, one list per row (e.g. originals above reconstructions)."""
    n_cols = max(len(r) for r in rows)
    fig = Figure(figsize=(scale * n_cols, scale * len(rows) + 0.3), layout="tight")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            ax = fig.add_subplot(len(rows), n_cols, i * n_cols + j + 1)
            ax.imshow(image.pixels, interpolation="nearest")
            ax.set_axis_off()
            if j == 0 and row_titles:
                ax.set_title(row_titles[i], fontsize=8, loc="left")
    return _save(fig, path)


def save_frame_strips(videos: list[Video], path: str | os.PathLike, titles: list[str] | None = None) -> Path:
    """Each video as one row of its frames."""
    rows = [[Image(f) for f in v.frames] for v in videos]
    return save_image_grid(rows, path, titles)


def save_spectrograms(clips: list[Audio], path: str | os.PathLike, titles: list[str] | None = None) -> Path:
    """Log-magnitude spectrograms (25 ms window, 10 ms hop), one panel per clip, stacked."""
    fig = Figure(figsize=(7, 1.8 * len(clips)), layout="tight")
    for i, clip in enumerate(clips):
        mono = clip.to_mono()
        x = torch.from_numpy(mono.samples[0])
        win, hop = int(0.025 * mono.sample_rate), int(0.010 * mono.sample_rate)
        spec = torch.stft(x, n_fft=win, hop_length=hop, window=torch.hann_window(win), return_complex=True).abs()
        db = 20 * torch.log10(spec.clamp(min=1e-5))  # [F, frames]
        ax = fig.add_subplot(len(clips), 1, i + 1)
        ax.imshow(db.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=float(db.max()) - 80,
                  extent=(0, mono.duration, 0, mono.sample_rate / 2000))
        ax.set(ylabel="kHz", title=titles[i] if titles else None)
    fig.axes[-1].set_xlabel("seconds")
    return _save(fig, path)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Written whole to a sibling, flushed, then renamed over `path`: a killed run leaves the old picture or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix[1:]))
    return path
