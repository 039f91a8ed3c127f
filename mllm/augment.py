"""Random perturbations of training media, so that models trained on a few thousand examples read new ones.

Images: other hands, other framings, other pens and paper. One random affine map (rotation, scale, shift) per
image; and a grayscale picture redrawn in a random ink on a random paper, since its colours carry nothing it
shows: MNIST writes white on black, a user's scan is dark ink on light paper. Drawn from the global torch RNG
unless a generator is given (seeded runs stay reproducible).

    jitter(pixels [B, C, H, W], AffineJitter(rotate_degrees=12, translate=0.08, scale=(0.9, 1.1))) -> [B, C, H, W]
    recolour(pixels [B, 3, H, W], Recolour(prob=0.5, min_contrast=0.4)) -> [B, 3, H, W]
    recolour_clips(clips [B, T, 3, H, W], Recolour(prob=0.5)) -> [B, T, 3, H, W]   (one ink and paper per clip)
    jitter_clips(clips [B, T, C, H, W], AffineJitter(...)) -> [B, T, C, H, W]       (one map per clip)
    retime_clips(clips [B, T, C, H, W], Retime(span=(0.5, 1.0), prob=0.5)) -> [B, T, C, H, W]   (slowed down)

Sound: other voices. Speed perturbation (Ko et al., 2015) plays a clip faster or slower, which moves its pitch
and formants as a shorter or longer vocal tract would, and changes its tempo; a time stretch (phase vocoder)
then changes the tempo alone, so that how fast a voice speaks no longer follows how high it sounds; a gain
changes its loudness. SpecAugment's masks (Park et al., 2019), done on the waveform: silenced frequency bands
(a band-stop over the whole clip) take away part of each vowel's formants, silenced spans whole sounds, so a
reader uses every cue and the context around each sound, not the few that the training voices share.

    perturb_audio(samples [C, N], AudioPerturb(speed=(0.85, 1.15), tempo=(0.85, 1.2), gain_db=(-10, 6),
                                               freq_masks=2, time_masks=2), rate, np_rng)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import librosa
import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F
from scipy.signal import resample_poly


@dataclass
class AffineJitter:
    rotate_degrees: float = 0.0  # uniform in ±this
    translate: float = 0.0  # uniform shift in ±this fraction of the side, per axis
    scale: tuple[float, float] = (1.0, 1.0)  # uniform zoom range (> 1 enlarges the content)
    prob: float = 1.0  # of each image being moved; the others pass unchanged

    def __post_init__(self):
        self.scale = tuple(self.scale)
        if not 0 <= self.prob <= 1:
            raise ValueError(f"augment: jitter prob must be in [0, 1], got {self.prob}")
        if not (0 <= self.rotate_degrees <= 180 and 0 <= self.translate < 0.5):
            raise ValueError(f"augment: need 0 <= rotate_degrees <= 180 and 0 <= translate < 0.5, got "
                             f"{self.rotate_degrees}, {self.translate}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"augment: scale must be a range (low, high) with 0 < low <= high, got {self.scale}")

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.rotate_degrees > 0 or self.translate > 0 or self.scale != (1.0, 1.0))


def jitter(pixels: torch.Tensor, cfg: AffineJitter, generator: torch.Generator | None = None) -> torch.Tensor:
    """pixels [B, C, H, W] -> the same batch, each image under its own random affine map (edges repeat outward)."""
    if not cfg.enabled:
        return pixels
    b = len(pixels)
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(cfg.rotate_degrees)
    zoom = cfg.scale[0] + torch.rand(b, generator=generator) * (cfg.scale[1] - cfg.scale[0])
    # affine_grid's frame spans [-1, 1]: a side is 2
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * cfg.translate * 2
    cos, sin = angle.cos() / zoom, angle.sin() / zoom  # the grid samples the input: the inverse map
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], -1), torch.stack([sin, cos, shift[:, 1]], -1)], 1)
    grid = F.affine_grid(theta.to(pixels), list(pixels.shape), align_corners=False)  # [B, H, W, 2]
    moved = F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)
    if cfg.prob == 1:
        return moved
    chosen = torch.rand(b, generator=generator) < cfg.prob  # [B]
    return torch.where(chosen[:, None, None, None].to(pixels.device), moved, pixels)


def jitter_clips(clips: torch.Tensor, cfg: AffineJitter, generator: torch.Generator | None = None) -> torch.Tensor:
    """clips [B, T, C, H, W] -> the same, each clip under one random affine map, every frame alike (as a camera or
    another renderer frames a whole clip)."""
    b, t, c, h, w = clips.shape
    return jitter(clips.reshape(b, t * c, h, w), cfg, generator).reshape(b, t, c, h, w)  # frames as channels


@dataclass
class Retime:
    span: tuple[float, float] = (1.0, 1.0)  # uniform range of the fraction of a clip's time shown (0.5: half speed)
    prob: float = 0.0  # of each clip being slowed; the others pass unchanged

    def __post_init__(self):
        self.span = tuple(self.span)
        if not 0 <= self.prob <= 1:
            raise ValueError(f"augment: retime prob must be in [0, 1], got {self.prob}")
        if len(self.span) != 2 or not 0 < self.span[0] <= self.span[1] <= 1:
            raise ValueError(f"augment: retime span must be a range (low, high) within (0, 1], got {self.span}")

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and self.span != (1.0, 1.0)


def retime_clips(clips: torch.Tensor, cfg: Retime, generator: torch.Generator | None = None) -> torch.Tensor:
    """clips [B, T, C, H, W] -> the same, each chosen clip slowed down: its T frames show a random stretch of
    `span` of the original's time, each frame a linear blend of the two original frames around its moment (as a
    slower renderer, with a little motion blur, would draw it)."""
    if not cfg.enabled:
        return clips
    b, t = clips.shape[:2]
    span = cfg.span[0] + torch.rand(b, generator=generator) * (cfg.span[1] - cfg.span[0])  # [B]
    start = torch.rand(b, generator=generator) * (1 - span)  # [B]
    chosen = torch.rand(b, generator=generator) < cfg.prob  # [B]
    moment = (start[:, None] + span[:, None] * torch.linspace(0, 1, t)) * (t - 1)  # [B, T] in original frames
    before = moment.floor().long().clamp(max=t - 1)
    after = (before + 1).clamp(max=t - 1)
    weight = (moment - before).to(clips)[:, :, None, None, None]  # [B, T, 1, 1, 1]
    frames = torch.arange(b)[:, None]
    slowed = (1 - weight) * clips[frames, before] + weight * clips[frames, after]
    return torch.where(chosen.to(clips.device)[:, None, None, None, None], slowed, clips)


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B in perceived brightness


@dataclass
class Recolour:
    prob: float = 0.0  # chance that a grayscale image is redrawn in a random ink on a random paper
    min_contrast: float = 0.4  # least luminance gap between ink and paper (of 1), so the strokes stay legible

    def __post_init__(self):
        if not (0 <= self.prob <= 1 and 0 < self.min_contrast <= 0.8):
            raise ValueError(f"augment: need 0 <= prob <= 1 and 0 < min_contrast <= 0.8, got {self.prob}, "
                             f"{self.min_contrast}")

    @property
    def enabled(self) -> bool:
        return self.prob > 0


def is_grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """pixels [B, 3, H, W] in [0, 1] -> [B] bool: its three channels agree to within a uint8 step everywhere."""
    return (pixels.amax(1) - pixels.amin(1)).flatten(1).amax(1) <= 1 / 255


def ink_on_paper(gray: torch.Tensor, min_contrast: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """gray [B, H, W] in [0, 1] (1: the strokes, 0: the ground) -> [B, 3, H, W]: paper + (ink - paper) · gray.
    Ink and paper are two grays for half the images (pencil, a scan) and two RGB colours for the rest (pens,
    coloured paper), each level arcsine-distributed, so near black, near white and saturated colours are
    common (black on white, a red pen); redrawn until their luminances differ by at least `min_contrast`.
    About half come out dark on light."""
    luma = torch.tensor(LUMA)

    def draw(n: int) -> torch.Tensor:  # [n, 2, 3]: ink, paper
        colours = (1 - torch.cos(math.pi * torch.rand(n, 2, 3, generator=generator))) / 2  # arcsine on [0, 1]
        grays = torch.rand(n, generator=generator) < 0.5
        colours[grays] = colours[grays][:, :, :1].expand(-1, -1, 3)
        return colours

    pairs = draw(len(gray))
    while (low := ((pairs[:, 0] - pairs[:, 1]) @ luma).abs() < min_contrast).any():
        pairs[low] = draw(int(low.sum()))
    ink, paper = pairs.to(gray)[:, :, :, None, None].unbind(1)  # [B, 3, 1, 1] each
    return paper + (ink - paper) * gray[:, None]


def recolour(pixels: torch.Tensor, cfg: Recolour, generator: torch.Generator | None = None) -> torch.Tensor:
    """pixels [B, 3, H, W] in [0, 1] -> the same batch, each grayscale image with probability `cfg.prob` in a
    random ink on a random paper (`ink_on_paper`). Colour images pass unchanged: their colours may be what
    they show. Draws the same numbers whichever images are chosen, so a batch's draws do not depend on it."""
    if not cfg.enabled:
        return pixels
    chosen = (torch.rand(len(pixels), generator=generator) < cfg.prob).to(pixels.device) & is_grayscale(pixels)
    redrawn = ink_on_paper(pixels.mean(1), cfg.min_contrast, generator)
    return torch.where(chosen[:, None, None, None], redrawn, pixels)


def recolour_clips(clips: torch.Tensor, cfg: Recolour, generator: torch.Generator | None = None) -> torch.Tensor:
    """clips [B, T, 3, H, W] in [0, 1] -> the same, each grayscale clip as `recolour` redraws an image: every frame
    in one ink on one paper."""
    b, t, c, h, w = clips.shape
    tall = clips.transpose(1, 2).reshape(b, c, t * h, w)  # [B, 3, T*H, W]: a clip's frames as one image
    return recolour(tall, cfg, generator).reshape(b, c, t, h, w).transpose(1, 2).contiguous()


STRETCH_WINDOW = 512  # phase-vocoder STFT size: 32 ms at 16 kHz, a speech frame


@dataclass
class AudioPerturb:
    speed: tuple[float, float] = (1.0, 1.0)  # uniform playback-rate range: 1.1 is 10 % faster and higher
    tempo: tuple[float, float] = (1.0, 1.0)  # uniform time-stretch range, pitch kept: 1.1 is 10 % faster
    gain_db: tuple[float, float] = (0.0, 0.0)  # uniform loudness change range, in dB
    freq_masks: int = 0  # silenced frequency bands per clip
    mask_hz: float = 500.0  # each band's width is uniform in [0, mask_hz]
    time_masks: int = 0  # silenced spans per clip
    mask_seconds: float = 0.08  # each span's length is uniform in [0, mask_seconds]

    def __post_init__(self):
        self.speed, self.tempo, self.gain_db = tuple(self.speed), tuple(self.tempo), tuple(self.gain_db)
        for name in ("speed", "tempo"):
            low_high = getattr(self, name)
            if len(low_high) != 2 or not 0.5 <= low_high[0] <= low_high[1] <= 2.0:
                raise ValueError(f"augment: {name} must be a range (low, high) within [0.5, 2], got {low_high}")
        if len(self.gain_db) != 2 or not -40 <= self.gain_db[0] <= self.gain_db[1] <= 20:
            raise ValueError(f"augment: gain_db must be a range (low, high) within [-40, 20], got {self.gain_db}")
        if self.time_masks < 0 or not 0 <= self.mask_seconds <= 1:
            raise ValueError(f"augment: need time_masks >= 0 and 0 <= mask_seconds <= 1, got {self.time_masks}, "
                             f"{self.mask_seconds}")
        if self.freq_masks < 0 or not 0 <= self.mask_hz <= 4000:
            raise ValueError(f"augment: need freq_masks >= 0 and 0 <= mask_hz <= 4000, got {self.freq_masks}, "
                             f"{self.mask_hz}")

    @property
    def enabled(self) -> bool:
        return (self.speed != (1.0, 1.0) or self.tempo != (1.0, 1.0) or self.gain_db != (0.0, 0.0)
                or (self.freq_masks > 0 and self.mask_hz > 0) or (self.time_masks > 0 and self.mask_seconds > 0))


def perturb_audio(samples: np.ndarray, cfg: AudioPerturb, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """float32 samples [C, N] in [-1, 1] -> the clip played at a random speed, stretched to a random tempo, with
    `freq_masks` random bands and `time_masks` random spans silenced, at a random gain: [C, about N / (speed ·
    tempo)], clipped to [-1, 1]. The sample rate is unchanged. Speed and gain are drawn for every clip; tempo,
    bands and spans only when they are on (tempo only for a clip of at least one window), in that order, so
    turning one on leaves the draws before it as they were and moves those after it."""
    if not cfg.enabled:
        return samples
    speed = Fraction(float(rng.uniform(*cfg.speed))).limit_denominator(100)
    gain = 10 ** (float(rng.uniform(*cfg.gain_db)) / 20)
    if speed != 1:  # N samples -> N · q / p: read at p/q of the rate
        samples = resample_poly(samples, speed.denominator, speed.numerator, axis=-1)
    if cfg.tempo != (1.0, 1.0) and samples.shape[-1] >= STRETCH_WINDOW:  # shorter than one window: nothing to stretch
        samples = librosa.effects.time_stretch(samples, rate=float(rng.uniform(*cfg.tempo)), n_fft=STRETCH_WINDOW)
    if cfg.freq_masks > 0 and cfg.mask_hz > 0:
        bands = []
        for _ in range(cfg.freq_masks):
            width = rng.uniform(0, cfg.mask_hz)
            low = rng.uniform(0, max(0.0, sample_rate / 2 - width))
            bands.append((low, low + width))
        samples = silence_bands(samples, bands, sample_rate)
    samples = np.clip(samples * gain, -1.0, 1.0).astype(np.float32)
    n = samples.shape[-1]
    for _ in range(cfg.time_masks):
        span = min(n, int(rng.uniform(0, cfg.mask_seconds) * sample_rate))
        start = int(rng.integers(n - span + 1))
        samples[..., start:start + span] = 0.0
    return samples


def silence_bands(samples: np.ndarray, bands: list[tuple[float, float]], sample_rate: int) -> np.ndarray:
    """samples [C, N] -> the same length with each (low, high) Hz band of the whole clip's spectrum set to zero."""
    n = samples.shape[-1]
    size = scipy.fft.next_fast_len(n, real=True)  # zero-padded: an N with a large prime factor is slow
    spectrum = scipy.fft.rfft(samples, n=size, axis=-1)  # [C, size // 2 + 1] bins of sample_rate / size Hz
    hz_per_bin = sample_rate / size
    for low, high in bands:
        spectrum[..., int(low / hz_per_bin):int(math.ceil(high / hz_per_bin))] = 0
    return scipy.fft.irfft(spectrum, n=size, axis=-1)[..., :n]
