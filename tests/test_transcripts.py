"""Transcript supervision of audio latents: CTC targets, greedy decoding and the linear CTC probe."""

from __future__ import annotations

import math

import pytest
import torch

from mllm.losses import ctc_loss
from mllm.tokenize.transcripts import (
    ALPHABET,
    NUM_CLASSES,
    collate,
    encode_text,
    greedy_ctc,
    linear_ctc_probe_cer,
    transcript_batches,
)

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "zero"]


def test_encode_text_keeps_letters_spaces_and_apostrophes():
    assert encode_text("  It's 3,  TWO ") == [ALPHABET.index(c) + 1 for c in "it's two"]
    assert encode_text("42!") == []


def test_greedy_ctc_merges_repeats_and_drops_blanks():
    def logits(classes):
        return torch.nn.functional.one_hot(torch.tensor(classes), NUM_CLASSES).float()

    h, e, l, o = (encode_text(c)[0] for c in "helo")
    assert greedy_ctc(logits([0, h, h, e, 0, l, l, 0, l, o, 0])) == "hello"
    assert greedy_ctc(logits([0, 0])) == ""


def test_batches_pad_and_count_frames():
    batch = collate([(torch.ones(5), "ab"), (torch.ones(9), "c")])
    assert batch.inputs.shape == (2, 9) and batch.inputs[0, 5:].abs().sum() == 0
    assert batch.targets.tolist() == encode_text("abc") and batch.target_lengths.tolist() == [2, 1]
    assert batch.frames(4).tolist() == [2, 3]
    with pytest.raises(ValueError, match="no transcribed clips"):
        next(transcript_batches([], 2, seed=0))


def spoken(text: str, dim: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """Latents [T, dim] that say `text`: two frames per character on its own direction, a silent frame between."""
    frames = []
    for k in encode_text(text):
        frames += [torch.nn.functional.one_hot(torch.tensor(k), dim).float()] * 2 + [torch.zeros(dim)]
    x = torch.stack(frames)
    return x + noise * torch.randn(x.shape, generator=gen)


def test_linear_probe_reads_latents_that_say_the_words_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[i] for i in torch.randint(10, (3,), generator=gen).tolist()) for _ in range(60)]
    clear = [(spoken(t, 32, 0.05, gen), t) for t in texts]
    assert linear_ctc_probe_cer(clear[:50], clear[50:], steps=400, batch_size=16) < 0.05
    noise = [(torch.randn(x.shape, generator=gen), t) for x, t in clear]
    assert linear_ctc_probe_cer(noise[:50], noise[50:], steps=400, batch_size=16) > 0.5


def test_ctc_loss_is_finite_when_a_clip_is_too_short_for_its_transcript():
    batch = collate([(torch.ones(4), "abcdef"), (torch.ones(8), "ab")])
    loss = ctc_loss(torch.randn(2, 4, NUM_CLASSES, requires_grad=True), batch.frames(2), batch.targets, batch.target_lengths)
    loss.backward()
    assert torch.isfinite(loss)


def test_linear_probe_scores_no_test_clips_nan_and_needs_train_clips():
    gen = torch.Generator().manual_seed(0)
    clips = [(spoken(t, 32, 0.05, gen), t) for t in WORDS]
    assert math.isnan(linear_ctc_probe_cer(clips, [], steps=1))  # not a CER of 0: nothing was read
    with pytest.raises(ValueError, match="no transcribed train clips"):
        linear_ctc_probe_cer([], clips, steps=1)
