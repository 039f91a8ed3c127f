"""A judge of moving-digit clips: which digits they show and which way they move.

Direction comes from the centroid track: the intensity-weighted centroid
(x, y) of every frame, and the sign of the larger of the total x and y
displacements, first frame to last (y grows downwards: +y is "down").

Digits are read by the `DigitJudge` (trained on original digit images only),
one lane at a time. The digits of a clip move side by side in lanes across
the motion, so the ink profile across the motion (summed over frames and
along the motion) splits into runs, one per digit. In every frame, each
lane's ink is cropped to a square of 1.5× its extent around its bounding
box (the digits corpus' framing: ink fills ~72% of an image side), and the
lane's digit is the majority of its frames' predictions.

    judge = VideoJudge.load_or_train(corpora_dir)
    judge.direction(video)         # "right"
    judge.digits(video)            # [3, 8]: sorted, one per lane

A clip's digits count as read when the sorted list equals the clip's sorted
digits: for a two-digit clip both must be read (and no third one).
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from mllm.judges.digits import DigitJudge
from mllm.media import Image, MediaError, Video

INK = 0.2  # of the peak: the ink threshold of a crop's extent
LANE_INK = 0.05  # of the peak: the ink threshold of a lane (the gap between two lanes is blank)
MIN_LANE_SHARE = 0.1  # lanes with less of the clip's ink are noise
FRAMING = 1.5  # crop side / ink extent (the digits corpus: ink fills ~72% of a side, plus slack)


def _grey(video: Video) -> np.ndarray:
    """[T, H, W] float in [0, 1]; refuses non-videos."""
    if not isinstance(video, Video):
        raise MediaError("<video judge>", f"expected a Video, got {type(video).__name__}")
    return video.frames.astype(np.float32).mean(axis=3) / 255


def centroid_track(video: Video) -> np.ndarray:
    """[T, 2]: the intensity-weighted (x, y) centroid of every frame; a blank frame repeats its neighbour's."""
    grey = _grey(video)
    t, h, w = grey.shape
    mass = grey.sum(axis=(1, 2))  # [T]
    ys, xs = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        track = np.stack([(grey.sum(axis=1) * xs).sum(1) / mass, (grey.sum(axis=2) * ys).sum(1) / mass], axis=1)
    inked = mass > 1e-6
    if not inked.any():
        return np.full((t, 2), [(w - 1) / 2, (h - 1) / 2], dtype=np.float32)
    for i in range(t):  # fill blank frames from the nearest inked one
        if not inked[i]:
            track[i] = track[np.flatnonzero(inked)[np.abs(np.flatnonzero(inked) - i).argmin()]]
    return track


def direction(video: Video) -> str:
    """"left" | "right" | "up" | "down": the sign of the dominant displacement of the centroid track."""
    dx, dy = centroid_track(video)[-1] - centroid_track(video)[0]
    if abs(dx) >= abs(dy):
        return "right" if dx >= 0 else "left"
    return "down" if dy >= 0 else "up"


def _runs(profile: np.ndarray) -> list[tuple[int, int]]:
    """Maximal [start, end) runs where profile > LANE_INK · max, dropping runs with < MIN_LANE_SHARE of the mass."""
    on = profile > LANE_INK * profile.max()
    runs, start = [], None
    for i, v in enumerate(np.append(on, False)):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    total = profile.sum()
    return [(a, b) for a, b in runs if profile[a:b].sum() >= MIN_LANE_SHARE * total]


def _crop(plane: np.ndarray, cross: tuple[int, int], along: tuple[int, int], transposed: bool) -> Image:
    """A square grey crop of `plane` [cross, along] around the box, zero-padded, as an RGB Image (upright again
    if the plane is a transposed frame)."""
    side = max(int(round(FRAMING * max(cross[1] - cross[0], along[1] - along[0]))), 4)
    out = np.zeros((side, side), dtype=np.float32)
    c0 = (cross[0] + cross[1] - side) // 2
    a0 = (along[0] + along[1] - side) // 2
    src = plane[max(c0, 0):c0 + side, max(a0, 0):a0 + side]
    out[max(-c0, 0):max(-c0, 0) + src.shape[0], max(-a0, 0):max(-a0, 0) + src.shape[1]] = src
    out = out.T if transposed else out
    return Image(np.repeat((out * 255).round().clip(0, 255).astype(np.uint8)[..., None], 3, axis=2))


class VideoJudge:
    """Digits (per lane, frame majority) and direction (centroid track) of moving-digit clips."""

    def __init__(self, digit_judge: DigitJudge):
        self.digit_judge = digit_judge

    @classmethod
    def load_or_train(cls, corpora_dir: str | os.PathLike, progress: bool = True) -> VideoJudge:
        """Over the cached digit judge of this corpora directory (trained first if there is none)."""
        return cls(DigitJudge.load_or_train(corpora_dir, progress=progress))

    direction = staticmethod(direction)

    def lane_crops(self, video: Video) -> list[list[Image]]:
        """For each lane (digit), its crop in every frame where it has ink."""
        grey = _grey(video)
        horizontal = direction(video) in ("left", "right")
        planes = grey if horizontal else grey.transpose(0, 2, 1)  # [T, cross, along]: lanes are rows
        lanes = _runs(planes.sum(axis=(0, 2)))
        crops: list[list[Image]] = []
        for a, b in lanes:
            frames = []
            for plane in planes:
                band = plane[a:b]
                along = np.flatnonzero(band.sum(axis=0) > INK * band.sum(axis=0).max()) if band.max() > 0 else []
                if len(along):
                    frames.append(_crop(plane, (a, b), (int(along[0]), int(along[-1]) + 1), not horizontal))
            if frames:
                crops.append(frames)
        return crops

    def digits(self, video: Video) -> list[int]:
        """The sorted digits of the clip, one per lane: the majority of that lane's per-frame readings."""
        return sorted(Counter(self.digit_judge.predict(frames)).most_common(1)[0][0] for frames in self.lane_crops(video))

    def scores(self, videos: list[Video], digits: list[list[int]], directions: list[str]) -> dict[str, float]:
        """Shares of clips whose sorted digits and whose direction the judge reads right."""
        if not videos or not len(videos) == len(digits) == len(directions):
            raise ValueError(f"need as many labels as clips (at least one), got {len(videos)}, {len(digits)}, {len(directions)}")
        read = [self.digits(v) == sorted(d) for v, d in zip(videos, digits)]
        moved = [self.direction(v) == d for v, d in zip(videos, directions)]
        single = [r for r, d in zip(read, digits) if len(d) == 1]
        double = [r for r, d in zip(read, digits) if len(d) > 1]
        return {
            "digit_accuracy": float(np.mean(read)),
            "digit_accuracy_1_digit": float(np.mean(single)) if single else float("nan"),
            "digit_accuracy_2_digits": float(np.mean(double)) if double else float("nan"),
            "direction_accuracy": float(np.mean(moved)),
        }
