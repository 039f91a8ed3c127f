"""Token cache: hits, misses, invalidation by tokenizer weights and config, crash safety, no re-encoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from mllm.data.cache import INDEX, TokenCache, fingerprint, source_key
from mllm.data.records import check_record, read_records
from mllm.media import Image, MediaError, Video, load_media, save_image, save_video
from mllm.processor import Processor
from mllm.tokenizers import MediaTokenizer, build_media_tokenizer

REPO = Path(__file__).resolve().parents[1]


@dataclass
class HalvesConfig:
    dim: int = 4


class HalvesTokenizer(MediaTokenizer):
    """A tokenizer with weights: the mean colour of the top and bottom half, projected -> [2, dim]."""

    name, modality, kind, config_class = "test-halves", "image", "continuous", HalvesConfig

    def __init__(self, config: HalvesConfig):
        super().__init__(config)
        self.proj = nn.Linear(3, config.dim)
        self.calls = 0

    @property
    def feature_dim(self) -> int:
        return self.config.dim

    def num_tokens(self, media) -> int:
        return 2

    @torch.no_grad()
    def encode(self, media: Image) -> torch.Tensor:
        self.calls += 1
        x = media.to_tensor()  # [3, H, W]
        h = x.shape[1] // 2
        return self.proj(torch.stack([x[:, :h].mean((1, 2)), x[:, h:].mean((1, 2))]))  # [2, dim]


def halves(seed: int = 0, dim: int = 4) -> HalvesTokenizer:
    torch.manual_seed(seed)
    return HalvesTokenizer(HalvesConfig(dim)).eval()


def png(path: Path, value: int) -> Path:
    pixels = np.full((8, 6, 3), value, np.uint8)
    pixels[4:] = 255 - value
    return save_image(Image(pixels), path)


def records_file(tmp_path: Path, values: list[int], name: str = "train.jsonl") -> Path:
    lines = []
    for v in values:
        png(tmp_path / "media" / f"{v}.png", v)
        lines.append({"id": f"r{v}", "messages": [
            {"role": "user", "content": [{"type": "image", "path": f"media/{v}.png"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"{v}"}]}]})
    path = tmp_path / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def rows(path: Path) -> list[dict]:
    return list(read_records(path, streaming=True))


def test_fingerprint_follows_weights_and_config_only():
    assert fingerprint(halves(0)) == fingerprint(halves(0))
    assert fingerprint(halves(0)) != fingerprint(halves(1))  # other weights
    assert fingerprint(halves(0)) != fingerprint(halves(0, dim=5))  # other config
    patch = build_media_tokenizer("patch", {"image_size": 16, "patch_size": 8})
    assert fingerprint(patch) == fingerprint(build_media_tokenizer("patch", {"image_size": 16, "patch_size": 8}))
    assert fingerprint(patch) != fingerprint(build_media_tokenizer("patch", {"image_size": 16, "patch_size": 4}))


def test_second_build_is_all_hits_and_lookup_gives_the_encoding(tmp_path):
    path = records_file(tmp_path, [10, 20, 30, 10])  # the last record repeats an image
    tok = halves()
    stats = TokenCache(tmp_path / "cache", {"image": tok}).encode_records(rows(path), progress=False)
    assert (stats.encoded, stats.cached, tok.calls) == (3, 1, 3)
    cache = TokenCache(tmp_path / "cache", {"image": tok})  # a new run
    stats = cache.encode_records(rows(path), progress=False)
    assert (stats.encoded, stats.cached, tok.calls) == (0, 4, 3)
    image = tmp_path / "media" / "20.png"
    expected = halves().encode(load_media(image, "image"))
    assert torch.equal(cache.lookup("image", image), expected)
    assert torch.equal(cache.lookup("image", image.read_bytes()), expected)  # keyed by content
    assert cache.lookup("image", png(tmp_path / "other.png", 99)) is None
    assert cache.lookup("audio", image) is None  # no such store
    [store] = (tmp_path / "cache").iterdir()
    assert store.name == f"image-{fingerprint(tok)[:16]}"


class BatchedHalves(HalvesTokenizer):
    """HalvesTokenizer that also takes a batch; refuses the medium of value 30 (MediaError), alone or in a batch."""

    name = "test-batched-halves"

    def __init__(self, config: HalvesConfig):
        super().__init__(config)
        self.batches: list[int] = []

    def encode(self, media: Image) -> torch.Tensor:
        if int(media.pixels[0, 0, 0]) == 30:
            raise MediaError("<array>", "a medium this tokenizer refuses")
        return super().encode(media)

    def encode_batch(self, images: list[Image]) -> torch.Tensor:
        self.batches.append(len(images))
        return torch.stack([self.encode(m) for m in images])


def test_media_encoded_in_batches_give_the_same_tokens_and_a_bad_one_is_left_out_alone(tmp_path):
    path = records_file(tmp_path, [10, 20, 40, 50, 60, 10, 70])
    alone = TokenCache(tmp_path / "alone", {"image": halves()})
    assert alone.encode_records(rows(path), progress=False).encoded == 6
    torch.manual_seed(0)
    tok = BatchedHalves(HalvesConfig()).eval()
    cache = TokenCache(tmp_path / "batched", {"image": tok}, batch_sizes={"image": 4})
    stats = cache.encode_records(rows(path), progress=False)
    assert (stats.encoded, stats.cached, stats.failed) == (6, 1, 0)
    assert tok.batches == [4, 2]  # 10, 20, 40, 50 in one call, the last two in another
    for v in (10, 20, 40, 50, 60, 70):
        assert torch.equal(cache.lookup("image", tmp_path / "media" / f"{v}.png"),
                           alone.lookup("image", tmp_path / "media" / f"{v}.png"))

    bad = records_file(tmp_path, [20, 30, 40], name="bad.jsonl")
    cache = TokenCache(tmp_path / "with_bad", {"image": tok}, batch_sizes={"image": 3})
    stats = cache.encode_records(rows(bad), progress=False)
    assert (stats.encoded, stats.failed) == (2, 1)  # the batch failed on 30, so each went alone
    assert cache.lookup("image", tmp_path / "media" / "30.png") is None
    assert torch.equal(cache.lookup("image", tmp_path / "media" / "40.png"), alone.lookup("image", tmp_path / "media" / "40.png"))
    with pytest.raises(ValueError, match="whole numbers from 1"):
        TokenCache(tmp_path / "x", {"image": tok}, batch_sizes={"image": 0})


class FirstFrames(MediaTokenizer):
    """A video tokenizer that reads 2 frames of a clip (`load_options`): each clip's frame count -> [1, 1]."""

    name, modality, kind, config_class = "test-first-frames", "video", "continuous", HalvesConfig
    load_options = {"even_frames": 2}

    @property
    def feature_dim(self) -> int:
        return 1

    def num_tokens(self, media) -> int:
        return 1

    def encode(self, media: Video) -> torch.Tensor:
        return torch.tensor([[float(media.num_frames)]])


def test_media_are_loaded_with_the_tokenizers_load_options(tmp_path):
    """As the processor loads them: a 12-frame clip is held as the 2 frames the tokenizer reads, not all 12."""
    save_video(Video(np.zeros((12, 16, 16, 3), np.uint8), fps=6), tmp_path / "clip.mp4")
    record = {"messages": [{"role": "user", "content": [{"type": "video", "path": "clip.mp4"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "A clip."}]}]}
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n")
    cache = TokenCache(tmp_path / "cache", {"video": FirstFrames(HalvesConfig())})
    assert cache.encode_records(rows(tmp_path / "r.jsonl"), progress=False).encoded == 1
    assert cache.lookup("video", tmp_path / "clip.mp4").tolist() == [[2.0]]


def test_changed_tokenizer_weights_miss_and_fill_a_new_directory(tmp_path):
    path = records_file(tmp_path, [10, 20])
    TokenCache(tmp_path / "cache", {"image": halves(0)}).encode_records(rows(path), progress=False)
    changed = halves(1)
    cache = TokenCache(tmp_path / "cache", {"image": changed})
    assert cache.lookup("image", tmp_path / "media" / "10.png") is None
    assert cache.encode_records(rows(path), progress=False).encoded == 2 and changed.calls == 2
    assert torch.equal(cache.lookup("image", tmp_path / "media" / "10.png"), changed.encode(load_media(tmp_path / "media" / "10.png", "image")))
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the old state's cache is left as it was


def test_an_edited_media_file_is_a_miss(tmp_path):
    path = records_file(tmp_path, [10])
    cache = TokenCache(tmp_path / "cache", {"image": halves()})
    cache.encode_records(rows(path), progress=False)
    image = tmp_path / "media" / "10.png"
    before = image.stat().st_mtime_ns
    png(image, 11)
    os.utime(image, ns=(before + 10**9, before + 10**9))
    assert cache.lookup("image", image) is None


def test_a_file_rewritten_with_its_size_and_mtime_kept_gets_a_new_key(tmp_path):
    """cp -p or rsync -t over a medium keeps its size and mtime; within one process its key must still follow it."""
    medium = tmp_path / "m.bin"
    medium.write_bytes(b"a" * 16)
    before, st = source_key(medium), medium.stat()
    medium.write_bytes(b"b" * 16)
    os.utime(medium, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert medium.stat().st_mtime_ns == st.st_mtime_ns and source_key(medium) != before
    assert source_key(medium) == source_key(b"b" * 16)


def test_tokenized_records_encode_exactly_and_never_call_the_tokenizer(tmp_path, mistral_tokenizer_dir):
    path = records_file(tmp_path, [10, 20])
    tok = halves()
    processor = Processor.create(AutoTokenizer.from_pretrained(mistral_tokenizer_dir), "plain", {"image": tok})
    cache = TokenCache(tmp_path / "cache", {"image": tok})
    cache.encode_records(rows(path), progress=False)
    for record in map(check_record, rows(path)):
        direct = processor.encode(record.messages, base_dir=record.base_dir)
        calls = tok.calls
        messages = cache.tokenize(record.messages, record.base_dir)
        assert messages[0]["content"][0]["type"] == "image" and "tokens" in messages[0]["content"][0]
        cached = processor.encode(messages, base_dir=record.base_dir)
        assert tok.calls == calls  # nothing re-encoded
        assert torch.equal(cached.input_ids, direct.input_ids) and torch.equal(cached.features["image"], direct.features["image"])


def test_a_failed_shard_write_leaves_the_cache_usable(tmp_path, monkeypatch):
    first, second = records_file(tmp_path, [10], "a.jsonl"), records_file(tmp_path, [20], "b.jsonl")
    TokenCache(tmp_path / "cache", {"image": halves()}).encode_records(rows(first), progress=False)
    real_replace = os.replace

    def crash_on_shards(src, dst):
        if Path(dst).name.startswith("shard-"):
            assert Path(src).stat().st_size > 0  # the shard's temp file was written in full
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_shards)
    with pytest.raises(OSError, match="disk full"):
        TokenCache(tmp_path / "cache", {"image": halves()}).encode_records(rows(second), progress=False)
    monkeypatch.setattr(os, "replace", real_replace)
    [store] = (tmp_path / "cache").iterdir()
    assert sorted(f.name for f in store.iterdir() if not f.name.startswith(".lock")) == [INDEX, "shard-00000.safetensors"]
    cache = TokenCache(tmp_path / "cache", {"image": halves()})
    assert cache.lookup("image", tmp_path / "media" / "10.png") is not None
    assert cache.lookup("image", tmp_path / "media" / "20.png") is None


CRASHING_BUILD = """
import os, signal, sys
from mllm.data.cache import TokenCache
from mllm.data.records import read_records
from mllm.tokenizers import build_media_tokenizer

real_replace = os.replace
def replace(src, dst):  # die, as on SIGKILL, instead of renaming onto `dst`
    if os.path.basename(dst) == sys.argv[3]:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
tok = build_media_tokenizer("patch", {"image_size": 8, "patch_size": 4})
TokenCache(sys.argv[1], {"image": tok}).encode_records(read_records(sys.argv[2], streaming=True), progress=False)
"""


@pytest.mark.parametrize("killed_at", ["shard-00001.safetensors", INDEX])
def test_a_killed_build_leaves_no_shard_a_later_run_trusts(tmp_path, killed_at):
    """Killed before the new shard is in place (a temp file is left) or before the index lists it
    (an unlisted shard is left): the earlier media still hit, the new ones miss, and a rerun repairs it."""
    first, both = records_file(tmp_path, [10], "a.jsonl"), records_file(tmp_path, [10, 20], "b.jsonl")
    tok = build_media_tokenizer("patch", {"image_size": 8, "patch_size": 4})
    TokenCache(tmp_path / "cache", {"image": tok}).encode_records(rows(first), progress=False)
    run = subprocess.run([sys.executable, "-c", CRASHING_BUILD, str(tmp_path / "cache"), str(both), killed_at],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == -9, run.stderr
    [store] = (tmp_path / "cache").iterdir()
    temp = {f.name[1:].rsplit(".", 2)[0] for f in store.glob(".*.tmp")}  # ".NAME.<pid>.tmp" -> NAME
    if killed_at == INDEX:  # the new shard is in place, the new index only in its temp file
        assert (store / "shard-00001.safetensors").exists() and temp == {INDEX}
    else:  # the new shard only in its temp file
        assert not (store / "shard-00001.safetensors").exists() and temp == {"shard-00001.safetensors"}
    assert json.loads((store / INDEX).read_text())["shards"].keys() == {"shard-00000.safetensors"}

    cache = TokenCache(tmp_path / "cache", {"image": tok})
    assert cache.lookup("image", tmp_path / "media" / "10.png") is not None
    assert cache.lookup("image", tmp_path / "media" / "20.png") is None  # the unfinished write is not trusted
    assert cache.encode_records(rows(both), progress=False).encoded == 1
    assert torch.equal(cache.lookup("image", tmp_path / "media" / "20.png"), tok.encode(load_media(tmp_path / "media" / "20.png", "image")))
    assert sorted(f.name for f in store.iterdir()) == [".lock", INDEX, "shard-00000.safetensors", "shard-00001.safetensors"]


def test_a_truncated_shard_is_dropped_and_encoded_again(tmp_path):
    path = records_file(tmp_path, [10])
    TokenCache(tmp_path / "cache", {"image": halves()}).encode_records(rows(path), progress=False)
    [store] = (tmp_path / "cache").iterdir()
    shard = store / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    cache = TokenCache(tmp_path / "cache", {"image": halves()})
    assert cache.lookup("image", tmp_path / "media" / "10.png") is None
    assert cache.encode_records(rows(path), progress=False).encoded == 1
    assert cache.lookup("image", tmp_path / "media" / "10.png") is not None


def test_writers_merge_with_the_index_on_disk(tmp_path):
    """Two runs (e.g. two ranks) open the cache, then each writes its own media: neither loses the other's."""
    a, b = records_file(tmp_path, [10], "a.jsonl"), records_file(tmp_path, [20], "b.jsonl")
    rank0, rank1 = TokenCache(tmp_path / "cache", {"image": halves()}), TokenCache(tmp_path / "cache", {"image": halves()})
    rank0.encode_records(rows(a), progress=False)
    rank1.encode_records(rows(b), progress=False)
    cache = TokenCache(tmp_path / "cache", {"image": halves()})
    assert all(cache.lookup("image", tmp_path / "media" / f"{v}.png") is not None for v in (10, 20))


def test_bad_records_and_unloadable_media_are_counted_not_cached(tmp_path):
    path = records_file(tmp_path, [10])
    (tmp_path / "media" / "bad.png").write_bytes(b"not a png")
    with open(path, "a") as f:
        f.write("{broken\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "path": "media/bad.png"}]}]}) + "\n")
    stats = TokenCache(tmp_path / "cache", {"image": halves()}).encode_records(rows(path), progress=False)
    assert (stats.encoded, stats.failed, stats.bad_records) == (1, 1, 1)
