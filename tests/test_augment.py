import numpy as np
import pytest
import torch

from mllm.augment import (
    LUMA, AffineJitter, AudioPerturb, Recolour, Retime, is_grayscale, jitter, jitter_clips, perturb_audio, recolour, recolour_clips,
    retime_clips,
)


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
    c = jitter(digit_batch(), cfg, torch.Generator().manual_seed(3))
    assert torch.equal(c, jitter(digit_batch(), cfg, torch.Generator().manual_seed(3))) and not torch.equal(a, c)


def test_jitter_moves_each_image_with_its_probability():
    cfg = AffineJitter(translate=0.2, prob=0.5)
    pixels = digit_batch().repeat(25, 1, 1, 1)  # [100, 3, 16, 16]
    out = jitter(pixels, cfg, torch.Generator().manual_seed(0))
    kept = (out == pixels).flatten(1).all(1)
    assert 25 < int(kept.sum()) < 75 and torch.equal(out, jitter(pixels, cfg, torch.Generator().manual_seed(0)))
    assert not AffineJitter(translate=0.2, prob=0.0).enabled


def test_pure_shift_keeps_the_ink():
    torch.manual_seed(0)
    shifted = jitter(digit_batch(), AffineJitter(translate=0.1))
    assert shifted.sum(dim=(1, 2, 3)).allclose(digit_batch().sum(dim=(1, 2, 3)), rtol=0.15)


@pytest.mark.parametrize("bad", [{"rotate_degrees": -1}, {"translate": 0.5}, {"prob": 1.5}, {"scale": (1.2, 0.8)}, {"scale": (0, 1)},
                                 {"scale": (1.0,)}])
def test_bad_jitter_configs_are_refused(bad):
    with pytest.raises(ValueError, match="augment"):
        AffineJitter(**bad)


def test_recolour_redraws_grayscale_strokes_in_a_legible_ink_on_a_paper_and_leaves_colour_alone():
    gray = digit_batch().repeat(8, 1, 1, 1)  # [32, 3, 16, 16]: white strokes on black
    colour = gray.clone()
    colour[:, 0] *= 0.5  # red at half: a colour picture
    generator = torch.Generator().manual_seed(0)
    out = recolour(torch.cat([gray, colour]), Recolour(prob=1.0, min_contrast=0.4), generator)
    assert torch.equal(out[32:], colour)
    ink, paper = out[:32, :, 8, 8], out[:32, :, 0, 0]  # [32, 3] each: a stroke pixel and a ground pixel
    assert (((ink - paper) @ torch.tensor(LUMA)).abs() >= 0.4 - 1e-6).all()
    assert ((ink @ torch.tensor(LUMA)) < (paper @ torch.tensor(LUMA))).any()  # some dark on light
    ground = gray[:, :1] == 0  # [32, 1, 16, 16]: every pixel off the strokes is the paper
    assert torch.equal(out[:32] * ground, paper[:, :, None, None] * ground)
    assert not is_grayscale(out[:32]).all() and is_grayscale(gray).all() and not is_grayscale(colour).any()


def test_recolour_follows_its_probability_and_its_seed():
    gray = digit_batch().repeat(50, 1, 1, 1)
    assert recolour(gray, Recolour()) is gray
    a = recolour(gray, Recolour(prob=0.5), torch.Generator().manual_seed(1))
    b = recolour(gray, Recolour(prob=0.5), torch.Generator().manual_seed(1))
    kept = (a == gray).flatten(1).all(1)
    assert torch.equal(a, b) and 50 < int(kept.sum()) < 150


@pytest.mark.parametrize("bad", [{"prob": 1.5}, {"prob": -0.1}, {"min_contrast": 0.0}, {"min_contrast": 0.9}])
def test_bad_recolour_configs_are_refused(bad):
    with pytest.raises(ValueError, match="augment"):
        Recolour(**bad)


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


def tone(hz: float, seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate))[None].astype(np.float32)


def peak_hz(clip: np.ndarray, rate: int = 16000) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(clip[0]))) * rate / clip.shape[-1])


@pytest.mark.parametrize("tempo", [0.85, 1.2])
def test_tempo_changes_the_length_and_keeps_the_pitch(tempo):
    out = perturb_audio(tone(440), AudioPerturb(tempo=(tempo, tempo)), 16000, np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape[-1] == pytest.approx(16000 / tempo, abs=2)
    assert peak_hz(out) == pytest.approx(440, abs=5)
    sped = perturb_audio(tone(440), AudioPerturb(speed=(1.2, 1.2)), 16000, np.random.default_rng(0))
    assert peak_hz(sped) == pytest.approx(528, abs=5)  # speed moves the pitch, tempo does not


def test_frequency_masks_silence_bands_of_the_spectrum():
    two = 0.2 * noise() + tone(300) + tone(2000)  # noise in every bin: a silenced bin is the mask's
    cfg = AudioPerturb(freq_masks=1, mask_hz=4000)
    hits = 0
    for seed in range(20):
        out = perturb_audio(two, cfg, 16000, np.random.default_rng(seed))
        assert out.shape == two.shape and np.abs(out).max() <= 1.0
        spectrum = np.abs(np.fft.rfft(out[0]))
        silent = int((spectrum < 1e-5 * spectrum.max()).sum())
        assert 0 <= silent <= 4000 + 2  # one band of at most 4000 Hz, 1 Hz per bin
        kept = [spectrum[hz] > 0.1 * np.abs(np.fft.rfft(two[0]))[hz] for hz in (300, 2000)]
        hits += not all(kept)
    assert 0 < hits < 20  # a random band: sometimes over a tone, sometimes not
    a, b = (perturb_audio(two, cfg, 16000, np.random.default_rng(3)) for _ in range(2))
    assert np.array_equal(a, b)


def test_an_added_perturbation_leaves_the_others_draws_unchanged():
    old = AudioPerturb(speed=(0.85, 1.15), gain_db=(-10, 6), time_masks=2)
    base = perturb_audio(noise(), old, 16000, np.random.default_rng(5))
    again = perturb_audio(noise(), AudioPerturb(speed=(0.85, 1.15), gain_db=(-10, 6), time_masks=2, mask_hz=900),
                          16000, np.random.default_rng(5))  # a band width with no bands: nothing drawn
    assert np.array_equal(base, again)


@pytest.mark.parametrize("bad", [{"speed": (1.2, 0.8)}, {"speed": (0.2, 1.0)}, {"gain_db": (0, 30)}, {"gain_db": (1,)},
                                 {"time_masks": -1}, {"mask_seconds": 2.0}, {"tempo": (0.3, 1.0)},
                                 {"tempo": (1.1, 0.9)}, {"freq_masks": -1}, {"mask_hz": 9000}])
def test_bad_audio_perturbations_are_refused(bad):
    with pytest.raises(ValueError, match="augment"):
        AudioPerturb(**bad)


def test_recolour_clips_draws_one_ink_and_paper_per_clip_for_every_frame():
    clips = digit_batch()[:, None].repeat(1, 3, 1, 1, 1)  # [4, 3, 3, 16, 16]: three frames of a white stroke
    out = recolour_clips(clips, Recolour(prob=1.0), torch.Generator().manual_seed(0))
    assert out.shape == clips.shape and out.is_contiguous()
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])  # the same pen in every frame
    assert not torch.equal(out[0, 0], out[1, 0]) and not is_grayscale(out[:, 0]).all()


def test_jitter_clips_moves_every_frame_of_a_clip_alike_and_each_clip_its_own_way():
    clips = digit_batch()[:, None].repeat(1, 3, 1, 1, 1)  # [4, 3, 3, 16, 16]: three frames of a white stroke
    out = jitter_clips(clips, AffineJitter(translate=0.2, scale=(0.6, 0.9)), torch.Generator().manual_seed(0))
    assert out.shape == clips.shape and not torch.allclose(out, clips, atol=0.05)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])  # one map for the whole clip
    assert not torch.equal(out[0, 0], out[1, 0])
    assert torch.equal(jitter_clips(clips, AffineJitter()), clips)


def test_retime_clips_shows_a_stretch_of_each_chosen_clip_slowed_down_and_blended_between_frames():
    clips = torch.arange(8.0)[None, :, None, None, None].repeat(64, 1, 3, 2, 2)  # [64, 8, 3, 2, 2]: frame t is t
    out = retime_clips(clips, Retime(span=(0.5, 0.5), prob=0.5), torch.Generator().manual_seed(0))
    moments = out[:, :, 0, 0, 0]  # [64, 8]: which original moment each frame shows
    slowed = (moments[:, -1] - moments[:, 0]) < 7
    assert 16 < int(slowed.sum()) < 48 and torch.equal(out[~slowed], clips[~slowed])
    steps = moments[slowed].diff(dim=1)
    assert torch.allclose(steps, torch.full_like(steps, 0.5))  # half speed: half a frame per frame, blended
    assert (moments >= 0).all() and (moments <= 7).all()
    assert torch.equal(out, retime_clips(clips, Retime(span=(0.5, 0.5), prob=0.5), torch.Generator().manual_seed(0)))
    assert not Retime().enabled and retime_clips(clips, Retime()) is clips


@pytest.mark.parametrize("bad", [{"span": (0.0, 1.0)}, {"span": (0.8, 0.5)}, {"span": (0.5, 1.2)}, {"prob": 1.5}])
def test_bad_retime_configs_are_refused(bad):
    with pytest.raises(ValueError, match="augment: retime"):
        Retime(**bad)


def test_every_image_and_clip_augmentation_stays_on_the_batchs_device():
    # the draws come from a CPU generator; recolour combined its CPU mask with the pixels' own (a GPU run crashed).
    # The meta device stands in for a GPU: it checks devices, and holds no data
    images, clips = torch.rand(4, 3, 8, 8, device="meta"), torch.rand(2, 3, 3, 8, 8, device="meta")
    move = AffineJitter(rotate_degrees=10, translate=0.1, scale=(0.9, 1.1), prob=0.5)
    for out in (jitter(images, move), recolour(images, Recolour(prob=0.9)), jitter_clips(clips, move),
                recolour_clips(clips, Recolour(prob=0.9)), retime_clips(clips, Retime(span=(0.5, 1.0), prob=0.5))):
        assert out.device.type == "meta"
