"""Processor with the real Mistral v1 SentencePiece tokenizer: spans, labels, errors, save/load."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from mllm.chat_template import list_chat_templates
from mllm.media import Image, MediaError, Video, load_media, save_image
from mllm.processor import CONFIG_FILE, MessageError, Processor, SequenceTooLongError
from mllm.sequence import IGNORE_INDEX
from mllm.tokenizers import build_media_tokenizer
from mllm.vocab import ModalitySpec


def make_processor(mistral_tokenizer_dir) -> Processor:
    tokenizer = AutoTokenizer.from_pretrained(mistral_tokenizer_dir)
    image = build_media_tokenizer("patch", {"image_size": 16, "patch_size": 8})  # 4 tokens of 192
    return Processor.create(tokenizer, "mistral", {"image": image}, [ModalitySpec("audio", "discrete", codebook_size=64)])


@pytest.fixture
def processor(mistral_tokenizer_dir) -> Processor:
    return make_processor(mistral_tokenizer_dir)


@pytest.fixture(scope="module")
def shared_processor(mistral_tokenizer_dir) -> Processor:
    """For tests that only read: built once per module."""
    return make_processor(mistral_tokenizer_dir)


def picture(value: int = 0) -> Image:
    return Image(np.full((20, 24, 3), value, np.uint8))


def labelled_text(processor: Processor, sample) -> str:
    return processor.tokenizer.decode(sample.input_ids[sample.labels != IGNORE_INDEX])


def test_labels_cover_only_assistant_content(processor):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "media": picture()}]},
        {"role": "assistant", "content": "A black square."},
        {"role": "user", "content": "And say it?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Here:"}, {"type": "audio", "tokens": [7, 0, 63]}]},
    ]
    s = processor.encode(messages)
    assert s.input_ids[0] == processor.tokenizer.bos_token_id
    audio = processor.layout["audio"]
    assert labelled_text(processor, s) == (
        "A black square.</s> Here:<audio><audio:7><audio:0><audio:63></audio></s>"
    )
    # labels equal ids wherever they are set
    set_ = s.labels != IGNORE_INDEX
    assert torch.equal(s.labels[set_], s.input_ids[set_])
    # the code span maps code c to code_offset + c
    codes = s.input_ids[(s.input_ids >= audio.code_offset) & (s.input_ids < audio.code_range[1])]
    assert codes.tolist() == [audio.code_offset + 7, audio.code_offset, audio.code_offset + 63]
    # the user's image is input only
    assert s.features["image"].shape == (4, 192) and not s.feature_targets["image"].any()
    full = processor.tokenizer.decode(s.input_ids)
    assert full.startswith("<s> [INST] Answer briefly.\n\nLook:<image>")  # system folded into the first user turn


def test_every_system_message_goes_into_the_next_user_turn(shared_processor):
    """The mistral template has no system turn: each system message opens the user turn after it."""
    rule = [{"role": "system", "content": "Rule one."}, {"role": "system", "content": "Rule two."}]
    s = shared_processor.encode(rule + [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                        {"role": "system", "content": "Rule three."}, {"role": "user", "content": "Bye"}])
    assert shared_processor.tokenizer.decode(s.input_ids) == (
        "<s> [INST] Rule one.\n\nRule two.\n\nHi [/INST] Yo</s> [INST] Rule three.\n\nBye [/INST]"
    )
    late = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Too late."}]
    with pytest.raises(MessageError, match=r"messages\[1\]: the mistral template puts a system message into the next user"):
        shared_processor.encode(late, add_generation_prompt=True)


def test_assistant_media_become_feature_targets(processor):
    messages = [
        {"role": "user", "content": [{"type": "image", "media": picture(10)}, {"type": "text", "text": "Draw it again, then another."}]},
        {"role": "assistant", "content": [{"type": "image", "media": picture(10)}, {"type": "text", "text": "and"}, {"type": "image", "media": picture(200)}]},
    ]
    s = processor.encode(messages)
    image = processor.layout["image"]
    assert s.feature_targets["image"].tolist() == [False] * 4 + [True] * 8
    assert (s.input_ids == image.placeholder_id).sum() == 12
    assert (s.labels == image.placeholder_id).sum() == 0  # placeholders carry no CE label
    assert (s.labels == image.begin_id).sum() == 2 and (s.labels == image.end_id).sum() == 2
    assert torch.equal(s.features["image"][4:8], s.features["image"][:4])  # same picture, same features


def test_media_sources_path_bytes_base64_and_tokens_agree(processor, tmp_path):
    save_image(picture(77), tmp_path / "p.png")
    raw = (tmp_path / "p.png").read_bytes()
    parts = [
        {"type": "image", "path": "p.png"},
        {"type": "image", "path": str(tmp_path / "p.png")},
        {"type": "image", "bytes": raw},
        {"type": "image", "bytes": base64.b64encode(raw).decode()},
        {"type": "image", "image": picture(77)},
        {"type": "image", "image": raw},  # HF style: the encoded file under the modality's own key
        {"type": "image", "media": bytearray(raw)},
        {"type": "image", "tokens": processor.media_tokenizers["image"].encode(picture(77)).tolist()},
    ]
    encoded = [processor.encode([{"role": "user", "content": [p]}], base_dir=tmp_path) for p in parts]
    for s in encoded[1:]:
        assert torch.equal(s.input_ids, encoded[0].input_ids)
        assert torch.allclose(s.features["image"], encoded[0].features["image"])


def test_base64_under_the_modality_key_is_named_briefly(shared_processor, tmp_path):
    save_image(Image(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)), tmp_path / "p.png")
    text = base64.b64encode((tmp_path / "p.png").read_bytes()).decode()  # about 2 kB
    with pytest.raises(MediaError, match="file not found") as e:  # a path there: base64 text goes under 'bytes'
        shared_processor.encode([{"role": "user", "content": [{"type": "image", "image": text}]}])
    assert len(str(e.value)) < 100 and e.value.source == text[:60] + "…"


def test_generation_prompt_and_batch_padding(processor):
    convo = [{"role": "user", "content": "Hi"}]
    prompt = processor.encode(convo, add_generation_prompt=True)
    longer = processor.encode([{"role": "user", "content": [{"type": "image", "media": picture()}, {"type": "text", "text": "Hello there"}]}])
    batch = processor([convo, convo[:1] + [{"role": "assistant", "content": "Hello"}]], padding_side="left", add_generation_prompt=False)
    assert batch.input_ids.shape[0] == 2 and batch.attention_mask[0, 0] == 0  # left-padded shorter row
    batch = processor([[{"role": "user", "content": [{"type": "image", "media": picture()}, {"type": "text", "text": "Hello there"}]}], convo])
    assert batch.features["image"].shape == longer.features["image"].shape
    assert processor.tokenizer.decode(prompt.input_ids).endswith("[/INST]")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\]: role must be one of"),
        ([{"role": "user"}], r"messages\[0\]: content must be"),
        ([{"role": "user", "content": [{"type": "img", "path": "a.png"}]}], r"messages\[0\].content\[0\]: unknown part type 'img'"),
        ([{"role": "user", "content": [{"type": "text"}]}], "needs a string 'text'"),
        ([{"role": "user", "content": [{"type": "image"}]}], "needs exactly one of"),
        ([{"role": "user", "content": [{"type": "image", "path": "a.png", "bytes": b""}]}], "found: path, bytes"),
        ([{"role": "user", "content": [{"type": "video", "path": "a.mp4"}]}], "this model has no video tokens"),
        ([{"role": "user", "content": [{"type": "audio", "path": "a.wav"}]}], "no audio tokenizer is loaded"),
        ([{"role": "user", "content": [{"type": "audio", "tokens": [1.5, 2.0]}]}], "must be integer codes, got torch.float32"),
        ([{"role": "user", "content": [{"type": "audio", "tokens": [True, False]}]}], "must be integer codes, got torch.bool"),
        ([{"role": "user", "content": [{"type": "audio", "tokens": [[1, 2]]}]}], r"must be \[N\], got shape \[1, 2\]"),
        ([{"role": "user", "content": [{"type": "audio", "tokens": [[1, 2], [3]]}]}], "rectangular array of numbers"),
        ([{"role": "user", "content": [{"type": "audio", "tokens": "1 2 3"}]}], "rectangular array of numbers"),
        ([{"role": "user", "content": [{"type": "audio", "tokens": [2**70]}]}], "rectangular array of numbers"),
        ([{"role": "user", "content": [{"type": "audio", "tokens": [1, 64]}]}], r"content\[0\]: audio: code 64 is outside \[0, 64\)"),
        ([{"role": "user", "content": [{"type": "audio", "tokens": []}]}], "empty audio tokens"),
        ([{"role": "user", "content": [{"type": "image", "tokens": [[0.0] * 5]}]}], r"must be \[N, 192\], got shape \[1, 5\]"),
        ([{"role": "user", "content": [{"type": "image", "tokens": [0.0] * 192}]}], r"must be \[N, 192\], got shape \[192\]"),
        ([{"role": "user", "content": [{"type": "image", "tokens": [[float("nan")] * 192]}]}], "contain NaN or inf"),
        ([{"role": "user", "content": [{"type": "image", "tokens": np.full((1, 192), 1e300)}]}], "NaN or inf"),
        ([{"role": "user", "content": [{"type": "image", "tokens": [[True] * 192]}]}], "real numbers, got torch.bool"),
        ([{"role": "user", "content": [{"type": "image", "bytes": "not base64!"}]}], "not valid base64"),
        ([{"role": "user", "content": [{"type": "image", "image": 42}]}], "expected a path, bytes or Image"),
    ],
)
def test_malformed_messages_name_the_offending_part(shared_processor, messages, match):
    with pytest.raises(MessageError, match=match):
        shared_processor.encode(messages)


def test_bad_media_are_reported(processor, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(MediaError, match="broken.png"):
        processor.encode([{"role": "user", "content": [{"type": "image", "path": "broken.png"}]}], base_dir=tmp_path)
    with pytest.raises(MediaError, match="missing.png"):
        processor.encode([{"role": "user", "content": [{"type": "image", "path": "missing.png"}]}], base_dir=tmp_path)


def test_max_length_is_enforced(processor):
    processor.max_length = 8
    with pytest.raises(SequenceTooLongError, match="over max_length 8"):
        processor.encode([{"role": "user", "content": "a fairly long message that will not fit"}])


def test_save_load_round_trip(processor, tmp_path):
    messages = [
        {"role": "user", "content": [{"type": "image", "media": picture(3)}, {"type": "text", "text": "Say a code"}]},
        {"role": "assistant", "content": [{"type": "audio", "tokens": [5]}]},
    ]
    processor.save_pretrained(tmp_path)
    loaded = Processor.from_pretrained(tmp_path)
    a, b = processor.encode(messages), loaded.encode(messages)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.features["image"], b.features["image"])
    assert loaded.template == processor.template and loaded.layout == processor.layout


def test_a_video_is_loaded_as_its_tokenizer_reads_it(mistral_tokenizer_dir, tmp_path, monkeypatch):
    from mllm import processor as processor_module
    from mllm.media import load_video, save_video

    video = build_media_tokenizer("video_divot", dict(frames=4, image_size=16, patch_size=4, width=32, heads=2, pool=2,
                                                        num_tokens=8, feature_dim=8, query_grid=[2, 2]))
    processor = Processor.create(AutoTokenizer.from_pretrained(mistral_tokenizer_dir), "mistral", {"video": video}, [])
    rng = np.random.default_rng(0)
    save_video(Video(rng.integers(0, 256, (30, 24, 24, 3), dtype=np.uint8), 10.0), tmp_path / "clip.mp4")
    loaded = []
    monkeypatch.setattr(processor_module, "load_media", lambda *a, **k: loaded.append(load_media(*a, **k)) or loaded[-1])
    encoded = processor.encode([{"role": "user", "content": [{"type": "video", "path": "clip.mp4"}]}], base_dir=tmp_path)
    assert [v.num_frames for v in loaded] == [4]  # not all 30
    assert torch.equal(encoded.features["video"], video.encode(load_video(tmp_path / "clip.mp4")))


@pytest.mark.parametrize("damage", [
    lambda c: "{truncated",
    lambda c: "[]",
    lambda c: json.dumps({k: v for k, v in c.items() if k != "vocab_layout"}),
    lambda c: json.dumps(c | {"vocab_layout": {"modalities": [{"spec": {}}]}}),
    lambda c: json.dumps(c | {"media_tokenizers": 3}),
])
def test_a_damaged_processor_config_is_named(processor, tmp_path, damage):
    processor.save_pretrained(tmp_path)
    config = tmp_path / "mllm_processor.json"
    config.write_text(damage(json.loads(config.read_text())))
    with pytest.raises(ValueError, match=f"{re.escape(str(config))}: not a valid processor config"):
        Processor.from_pretrained(tmp_path)


@pytest.mark.parametrize("template", ["plain", "chatml", "mistral"])
def test_every_template_labels_exactly_the_assistant_turn(mistral_tokenizer_dir, template):
    assert template in list_chat_templates()
    tokenizer = AutoTokenizer.from_pretrained(mistral_tokenizer_dir)
    processor = Processor.create(tokenizer, template)
    s = processor.encode([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello friend"}])
    text = labelled_text(processor, s)
    assert text.startswith("Hello friend") and "Hi" not in text and "kind" not in text


def test_chatml_ends_a_turn_at_im_end_whatever_the_eos(mistral_tokenizer_dir, tmp_path):
    """A Qwen2-like tokenizer: <|im_end|> is a special token and eos is another one."""
    tokenizer = AutoTokenizer.from_pretrained(mistral_tokenizer_dir)
    assert Processor.create(tokenizer, "chatml").end_of_turn_id == tokenizer.eos_token_id  # no <|im_end|> token yet
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    processor = Processor.create(tokenizer, "chatml")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert processor.end_of_turn_id == im_end != tokenizer.eos_token_id
    s = processor.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert s.labels[s.labels != IGNORE_INDEX].tolist()[-2] == im_end  # what training labels as the end of the turn
    assert Processor.create(tokenizer, "plain").end_of_turn_id == tokenizer.eos_token_id
    # a checkpoint saved before templates had a stop token gets the registered template's
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    del config["chat_template"]["stop_token"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    assert Processor.from_pretrained(tmp_path).end_of_turn_id == im_end
