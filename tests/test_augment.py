import numpy as np
import pytest
import torch

from mllm.augment import AffineJitter, AudioPerturb, jitter, perturb_audio


def digit_batch() -> torch.Tensor:
    pixels = torch.zeros(4, 3, 16, 16)
    pixels[:, :, 4:12, 7:9] = 1.0  # a vertical stroke
    return pixels


def test_disabled_jitter_returns_the_batch_itself():
    pixels = digit_batch()
    assert not AffineJitter().enabled and jitter(pixels, AffineJitter()) is pixels


def test_jitter_moves_each_image_its_own_way_and_is_seeded():
    cfg = AffineJitter(rotate_degrees=20, translate=0.1, scale=(0.8, 1.2))
    torch.manual_seed(0)
    a = jitter(digit_batch(), cfg)
    torch.manual_seed(0)
    b = jitter(digit_batch(), cfg)
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b)
    assert not torch.allclose(a, digit_batch(), atol=0.05)
    assert len({tuple(x.flatten().tolist()) for x in a}) == 4  # one random map per image
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_pure_shift_keeps_the_ink():
    torch.manual_seed(0)
    shifted = jitter(digit_batch(), AffineJitter(translate=0.1))
    assert shifted.sum(dim=(1, 2, 3)).allclose(digit_batch().sum(dim=(1, 2, 3)), rtol=0.15)


@pytest.mark.parametrize("bad", [{"rotate_degrees": -1}, {"translate": 0.5}, {"scale": (1.2, 0.8)}, {"scale": (0, 1)},
                                 {"scale": (1.0,)}])
def test_bad_jitter_configs_are_refused(bad):
    with pytest.raises(ValueError, match="augment"):
        AffineJitter(**bad)


# ---------------------------------------------------------------- audio


def noise(seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    return np.random.default_rng(0).uniform(-0.5, 0.5, (1, round(seconds * rate))).astype(np.float32)


def test_disabled_perturbation_returns_the_clip_itself():
    clip = noise()
    assert not AudioPerturb().enabled and perturb_audio(clip, AudioPerturb(), 16000, np.random.default_rng(0)) is clip


@pytest.mark.parametrize("speed", [0.8, 0.9, 1.25])
def test_speed_scales_the_length_and_gain_the_level(speed):
    clip = noise()
    out = perturb_audio(clip, AudioPerturb(speed=(speed, speed), gain_db=(-6, -6)), 16000, np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == (1, round(16000 / speed))
    rms = lambda x: float(np.sqrt((x ** 2).mean()))  # noqa: E731
    assert rms(out) == pytest.approx(rms(clip) * 10 ** (-6 / 20), rel=0.15)  # resampling keeps most of the band


def test_perturbation_is_seeded_and_masks_silence_spans():
    cfg = AudioPerturb(speed=(0.85, 1.15), gain_db=(-10, 6), time_masks=2, mask_seconds=0.1)
    a, b = (perturb_audio(noise(), cfg, 16000, np.random.default_rng(7)) for _ in range(2))
    c = perturb_audio(noise(), cfg, 16000, np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)
    assert 0 < int((a == 0).sum()) <= 2 * 1600 + 2  # at most two spans of 0.1 s
    assert np.abs(a).max() <= 1.0
    loud = perturb_audio(noise() * 1.9, AudioPerturb(gain_db=(12, 12)), 16000, np.random.default_rng(0))
    assert np.abs(loud).max() == 1.0  # clipped, not wrapped


@pytest.mark.parametrize("bad", [{"speed": (1.2, 0.8)}, {"speed": (0.2, 1.0)}, {"gain_db": (0, 30)}, {"gain_db": (1,)},
                                 {"time_masks": -1}, {"mask_seconds": 2.0}])
def test_bad_audio_perturbations_are_refused(bad):
    with pytest.raises(ValueError, match="augment"):
        AudioPerturb(**bad)
