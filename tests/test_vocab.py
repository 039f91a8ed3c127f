"""VocabLayout on the real Mistral tokenizer: contiguous real added tokens, code mapping, serialisation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from mllm.vocab import ModalitySpec, VocabLayout


@pytest.fixture(scope="module")
def layout_and_tokenizer(mistral_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(mistral_tokenizer_dir)
    specs = [ModalitySpec("image", "discrete", codebook_size=8192), ModalitySpec("audio", "continuous", feature_dim=64)]
    return VocabLayout.extend(tokenizer, specs), tokenizer


def test_tokens_are_real_contiguous_added_tokens(layout_and_tokenizer):
    layout, tokenizer = layout_and_tokenizer
    image, audio = layout["image"], layout["audio"]
    assert layout.text_vocab_size == 32000 and layout.vocab_size == len(tokenizer) == 32000 + 2 + 8192 + 3
    assert tokenizer.convert_ids_to_tokens([image.begin_id, image.end_id]) == ["<image>", "</image>"]
    assert tokenizer.convert_ids_to_tokens(list(range(*image.code_range)))[::4095] == ["<image:0>", "<image:4095>", "<image:8190>"]
    assert tokenizer.convert_ids_to_tokens(audio.placeholder_id) == "<audio:feat>"
    assert min(image.begin_id, audio.begin_id, image.code_offset) >= 32000  # never a sentinel or a text id
    # an added token in text is one token, not split into pieces
    assert tokenizer("<image:17>", add_special_tokens=False)["input_ids"][-1] == image.code_offset + 17


def test_code_ids_map_and_validate(layout_and_tokenizer):
    layout, _ = layout_and_tokenizer
    off = layout["image"].code_offset
    assert layout.code_ids("image", torch.tensor([0, 5, 8191])).tolist() == [off, off + 5, off + 8191]
    with pytest.raises(ValueError, match=r"code 8192 is outside \[0, 8192\)"):
        layout.code_ids("image", torch.tensor([1, 8192]))
    with pytest.raises(ValueError, match="code -1"):
        layout.code_ids("image", torch.tensor([-1]))
    with pytest.raises(ValueError, match="audio is continuous"):
        layout.code_ids("audio", torch.tensor([1]))
    with pytest.raises(KeyError, match="modality 'video' is not in this vocabulary"):
        layout["video"]


def test_round_trip_and_bad_specs(layout_and_tokenizer):
    layout, tokenizer = layout_and_tokenizer
    assert VocabLayout.from_dict(layout.to_dict()) == layout
    with pytest.raises(ValueError, match="already has media token '<image>'"):
        VocabLayout.extend(tokenizer, [ModalitySpec("image", "discrete", codebook_size=4)])
    with pytest.raises(ValueError, match="needs codebook_size > 0"):
        ModalitySpec("image", "discrete")
    with pytest.raises(ValueError, match="not one of"):
        ModalitySpec("smell", "continuous", feature_dim=3)
