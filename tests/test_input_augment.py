"""Training-time perturbation of user media: what it replaces, what it leaves, and that a pass replays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from mllm.augment import AudioPerturb
from mllm.data.input_augment import InputAugment, InputAugmentConfig
from mllm.data.loader import MultimodalLoader
from mllm.data.records import read_records
from mllm.media import save_audio
from mllm.processor import Processor
from mllm.tokenizers.mel_latent import MelLatentConfig, MelLatentTokenizer
from tests.test_audio_tokenizers import tone

VOICES = InputAugmentConfig(audio=AudioPerturb(speed=(0.85, 1.15), gain_db=(-10, 6), time_masks=2))


@pytest.fixture(scope="module")
def processor(mistral_tokenizer_dir) -> Processor:
    torch.manual_seed(0)
    audio = MelLatentTokenizer(MelLatentConfig(channels=16, depth=1)).eval()  # 25 tokens per second
    return Processor.create(AutoTokenizer.from_pretrained(mistral_tokenizer_dir), "plain", {"audio": audio})


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Two records: a transcribed spoken question (user audio), and a request answered with speech (assistant audio)."""
    save_audio(tone(0.8), tmp_path / "media" / "q.wav")
    save_audio(tone(0.4), tmp_path / "media" / "a.wav")
    rows = [
        {"id": "asr", "messages": [{"role": "user", "content": [{"type": "audio", "path": "media/q.wav", "transcript": "two"},
                                                                {"type": "text", "text": "What was said?"}]},
                                   {"role": "assistant", "content": [{"type": "text", "text": "two"}]}]},
        {"id": "tts", "messages": [{"role": "user", "content": [{"type": "text", "text": "Say two."}]},
                                   {"role": "assistant", "content": [{"type": "audio", "path": "media/a.wav"}]}]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def features(processor, corpus, augment: InputAugment | None) -> list[torch.Tensor]:
    loader = MultimodalLoader(read_records(corpus, streaming=True), processor, max_length=256, batch_size=1,
                              packing=False, augment=augment, policy="fail")
    return [s.features["audio"] for s in loader.samples()]


def test_user_audio_is_heard_anew_and_assistant_audio_is_left(processor, corpus):
    plain = features(processor, corpus, None)
    heard = features(processor, corpus, InputAugment(VOICES, processor, seed=0))
    assert not torch.equal(heard[0], plain[0])  # the question: another speed, loudness and silences
    assert abs(len(heard[0]) - len(plain[0])) <= 4  # 0.8 s at 0.85-1.15 speed: 18-24 tokens, 20 unperturbed
    assert torch.equal(heard[1], plain[1])  # the head's target is what the corpus holds


def test_a_pass_replays_from_its_seed_and_another_seed_hears_other_voices(processor, corpus):
    a = features(processor, corpus, InputAugment(VOICES, processor, seed=3))
    b = features(processor, corpus, InputAugment(VOICES, processor, seed=3))
    c = features(processor, corpus, InputAugment(VOICES, processor, seed=4))
    assert torch.equal(a[0], b[0])
    assert a[0].shape != c[0].shape or not torch.equal(a[0], c[0])


def test_cached_tokens_are_left_and_a_disabled_config_changes_nothing(processor):
    augment = InputAugment(VOICES, processor, seed=0)
    tokens = [{"role": "user", "content": [{"type": "audio", "tokens": torch.zeros(3, 16)}]}]
    assert augment(tokens, None) == tokens
    assert not InputAugmentConfig().enabled
    media = [{"role": "user", "content": [{"type": "audio", "path": "missing.wav"}]}]
    assert InputAugment(InputAugmentConfig(), processor, seed=0)(media, None) == media


def test_a_corrupt_spoken_question_is_a_bad_record_naming_the_file(processor, corpus, tmp_path):
    (tmp_path / "media" / "q.wav").write_bytes(b"RIFF, but not a wave")
    loader = MultimodalLoader(read_records(corpus, streaming=True), processor, max_length=256, batch_size=1,
                              packing=False, augment=InputAugment(VOICES, processor, seed=0))
    assert len(list(loader.samples())) == 1
    [error] = loader.bad.skipped
    assert error.reason == "corrupt_media" and "train.jsonl:1" in str(error) and "q.wav" in str(error)
