import pytest
import torch

from mllm.augment import AffineJitter, jitter


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
