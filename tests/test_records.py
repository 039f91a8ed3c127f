"""Record files (JSONL, Parquet, streaming, per rank), bad records by reason with file:line, the LLaVA converter."""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from mllm.data.llava import convert_llava
from mllm.data.loader import MultimodalLoader
from mllm.data.records import BadRecordError, BadRecords, NoRecordsError, check_record, iter_records, read_records
from mllm.media import Image, save_image
from mllm.processor import Processor
from mllm.tokenizers import build_media_tokenizer

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def processor(mistral_tokenizer_dir) -> Processor:
    image = build_media_tokenizer("patch", {"image_size": 16, "patch_size": 8})  # 4 tokens per image
    return Processor.create(AutoTokenizer.from_pretrained(mistral_tokenizer_dir), "plain", {"image": image})


def png(path: Path, value: int = 0) -> Path:
    return save_image(Image(np.full((8, 8, 3), value, np.uint8)), path)


def qa(image: dict, question: str = "What is it?", answer: str = "A square.") -> dict:
    return {"messages": [{"role": "user", "content": [image, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A record file in a subfolder, its media beside it."""
    png(tmp_path / "c" / "media" / "a.png", 10)
    png(tmp_path / "c" / "media" / "b.png", 200)
    return write_jsonl(tmp_path / "c" / "train.jsonl", [
        qa({"type": "image", "path": "media/a.png"}) | {"id": "r0", "corpus": "c", "task": "image_qa", "meta": {"label": 1}},
        {"id": "r1", "text": "plain text becomes one assistant turn"},
        qa({"type": "image", "bytes": base64.b64encode((tmp_path / "c" / "media" / "b.png").read_bytes()).decode()}),
    ])


def test_jsonl_rows_keep_file_line_and_base_dir(corpus):
    ds = read_records(corpus, cache_dir=corpus.parent / "hf")
    assert len(ds) == 3 and ds[0]["where"] == f"{corpus}:1" and ds[2]["where"] == f"{corpus}:3"
    records = [check_record(row) for row in ds]
    assert records[0].id == "r0" and records[0].corpus == "c" and records[0].task == "image_qa" and records[0].meta == {"label": 1}
    assert records[0].base_dir == str(corpus.parent)
    assert records[1].messages == [{"role": "assistant", "content": [{"type": "text", "text": "plain text becomes one assistant turn"}]}]
    assert records[2].id == f"{corpus}:3"  # no id: named by where it is


def test_streaming_gives_the_same_rows(corpus):
    streamed = list(read_records(corpus, streaming=True))
    assert streamed == list(read_records(corpus, cache_dir=corpus.parent / "hf"))


def test_map_style_table_is_rebuilt_when_a_file_changes(corpus):
    assert len(read_records(corpus, cache_dir=corpus.parent / "hf")) == 3
    write_jsonl(corpus, [{"text": "only one now"}])
    assert len(read_records(corpus, cache_dir=corpus.parent / "hf")) == 1


@pytest.mark.parametrize("streaming", [False, True])
def test_record_files_that_hold_no_record_are_named(tmp_path, streaming, caplog):
    empty = [write_jsonl(tmp_path / "a.jsonl", [""]), tmp_path / "b.parquet"]
    pq.write_table(pa.table({"id": pa.array([], pa.string())}), empty[1])
    with pytest.raises(NoRecordsError, match=f"no records in {empty[0]}, {empty[1]}: every file is empty"):
        read_records(empty, streaming=streaming, cache_dir=tmp_path / "hf")
    full = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    with caplog.at_level(logging.WARNING):
        assert len(list(read_records([*empty, full], streaming=streaming, cache_dir=tmp_path / "hf"))) == 1
    assert f"no records in {empty[0]}, {empty[1]}: empty" in caplog.text


@pytest.mark.parametrize("in_place", [True, False], ids=["cp -p", "rsync -t"])
def test_a_rewrite_that_keeps_size_and_mtime_is_not_served_from_the_cache(tmp_path, in_place):
    """cp -p rewrites the file in place, rsync -t renames a new one over it; both keep size and mtime."""
    path = write_jsonl(tmp_path / "r.jsonl", [{"id": "x", "text": "hello"}])
    assert json.loads(read_records(path, cache_dir=tmp_path / "hf")[0]["messages"])[0]["content"][0]["text"] == "hello"
    st = path.stat()
    new = path if in_place else tmp_path / ".r.jsonl.tmp"
    write_jsonl(new, [{"id": "x", "text": "HELLO"}])
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, path)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert json.loads(read_records(path, cache_dir=tmp_path / "hf")[0]["messages"])[0]["content"][0]["text"] == "HELLO"


@pytest.mark.parametrize("streaming", [False, True])
def test_split_by_node_gives_each_rank_its_own_records(tmp_path, streaming):
    files = [write_jsonl(tmp_path / f"{k}.jsonl", [{"id": f"{k}-{i}", "text": "x"} for i in range(5)]) for k in range(4)]
    parts = [[r["id"] for r in read_records(files, streaming=streaming, rank=rank, world_size=2, cache_dir=tmp_path / "hf")]
             for rank in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(f"{k}-{i}" for k in range(4) for i in range(5))


def test_parquet_with_nested_messages_and_embedded_bytes(tmp_path, processor):
    image = png(tmp_path / "media" / "a.png", 90).read_bytes()
    rows = [qa({"type": "image", "bytes": image}), qa({"type": "image", "path": "media/a.png"}),
            {"messages": json.dumps(qa({"type": "image", "path": "media/a.png"})["messages"])}]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:2]), path)
    pq.write_table(pa.Table.from_pylist(rows[2:]), tmp_path / "json_column.parquet")
    ds = read_records([path, tmp_path / "json_column.parquet"], cache_dir=tmp_path / "hf")
    assert [r["where"] for r in ds] == [f"{path}:row 0", f"{path}:row 1", f"{tmp_path / 'json_column.parquet'}:row 0"]
    samples = [processor.encode(r.messages, base_dir=r.base_dir) for r in map(check_record, ds)]
    assert all(s.features["image"].shape == (4, 192) for s in samples)
    assert (samples[0].features["image"] == samples[1].features["image"]).all()  # bytes and path: one image


# ---- bad records ------------------------------------------------------------------------------


def bad_line(kind: str, tmp_path: Path):
    """The second line of a record file, bad in one way, and the reason it must be reported under."""
    if kind == "invalid_json":
        return '{"messages": [', "invalid_json"
    if kind == "malformed_message":
        return {"messages": [{"role": "bot", "content": "hi"}]}, "malformed_message"
    if kind == "missing_media":
        return qa({"type": "image", "path": "media/nowhere.png"}), "missing_media"
    if kind == "corrupt_media":
        (tmp_path / "media" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        return qa({"type": "image", "path": "media/corrupt.png"}), "corrupt_media"
    if kind == "too_long":
        return qa({"type": "image", "path": "media/good.png"}, answer="word " * MAX_LENGTH), "too_long"
    raise AssertionError(kind)


CASES = ["invalid_json", "malformed_message", "missing_media", "corrupt_media", "too_long"]


@pytest.mark.parametrize("kind", CASES)
def test_a_bad_record_is_skipped_and_reported_with_file_and_line(tmp_path, processor, kind, caplog):
    png(tmp_path / "media" / "good.png")
    line, reason = bad_line(kind, tmp_path)
    good = qa({"type": "image", "path": "media/good.png"})
    path = write_jsonl(tmp_path / "train.jsonl", [good, line, good])
    loader = MultimodalLoader(read_records(path, streaming=True), processor, max_length=MAX_LENGTH, batch_size=4)
    with caplog.at_level(logging.INFO):
        batches = list(loader)
    assert batches[0].input_ids.shape[0] == 1 and (batches[0].position_ids == 0).sum() == 2 + 1  # 2 documents + padding
    assert loader.bad.counts == {reason: 1} and loader.bad.seen == 3
    [error] = loader.bad.skipped
    assert error.where == f"{path}:2" and error.reason == reason
    assert f"{path}:2: {reason}" in caplog.text  # each skipped record is logged
    assert f"skipped 1 of 3 records ({reason} 1)" in caplog.text  # and the counts at the end


@pytest.mark.parametrize("kind", CASES)
def test_a_bad_record_fails_the_run_under_the_fail_policy(tmp_path, processor, kind):
    png(tmp_path / "media" / "good.png")
    line, reason = bad_line(kind, tmp_path)
    path = write_jsonl(tmp_path / "train.jsonl", [qa({"type": "image", "path": "media/good.png"}), line])
    loader = MultimodalLoader(read_records(path, streaming=True), processor, max_length=MAX_LENGTH, batch_size=4,
                              packing=False, policy="fail")
    with pytest.raises(BadRecordError, match=f"{path}:2: {reason}") as e:
        list(loader)
    assert e.value.reason == reason


def test_every_record_is_either_used_or_reported(tmp_path, processor):
    png(tmp_path / "media" / "good.png")
    lines = [bad_line(kind, tmp_path)[0] for kind in CASES] + [qa({"type": "image", "path": "media/good.png"})] * 3
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    loader = MultimodalLoader(read_records(path, streaming=True), processor, max_length=MAX_LENGTH, batch_size=2, packing=False)
    used = sum(b.input_ids.shape[0] for b in loader)
    assert used == 3 and len(loader.bad.skipped) == len(CASES) and used + len(loader.bad.skipped) == loader.bad.seen
    assert sorted(e.where for e in loader.bad.skipped) == sorted(f"{path}:{n}" for n in range(1, len(CASES) + 1))


def test_the_policy_must_be_skip_or_fail():
    with pytest.raises(ValueError, match="'skip' or 'fail'"):
        BadRecords("ignore")
    bad = BadRecords("skip")
    assert list(iter_records([], bad)) == [] and bad.summary() == "no bad records among 0"


# ---- LLaVA ------------------------------------------------------------------------------------


def test_llava_conversion_puts_images_where_their_markers_were(tmp_path, processor):
    images = tmp_path / "llava_images"
    png(images / "coco" / "1.png")
    png(images / "coco" / "2.png", 50)
    items = [
        {"id": "a", "image": "coco/1.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "b", "image": "coco/2.png", "conversations": [
            {"from": "human", "value": "Look at this"}, {"from": "gpt", "value": "Grey."}]},  # no marker
        {"id": "c", "image": ["coco/1.png", "coco/2.png"], "conversations": [
            {"from": "human", "value": "Compare <image> and\n<image>\nplease."}, {"from": "gpt", "value": "Different."}]},
        {"id": "d", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "e", "image": "coco/1.png", "conversations": [{"from": "robot", "value": "<image>"}]},
        {"id": "f", "image": "coco/1.png", "conversations": [{"from": "human", "value": "<image> <image>"}]},
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(items))
    out = tmp_path / "converted" / "train.jsonl"
    bad = convert_llava(src, images, out)
    assert [(e.where, e.reason) for e in bad.skipped] == [(f"{src}[4]", "malformed_message"), (f"{src}[5]", "malformed_message")]
    assert "2 <image> markers for 1 images" in bad.skipped[1].detail
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "c", "d"]
    image = {"type": "image", "path": "../llava_images/coco/1.png"}
    assert records[0]["messages"] == [
        {"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
    ]
    assert records[1]["messages"][0]["content"] == [{"type": "image", "path": "../llava_images/coco/2.png"},
                                                    {"type": "text", "text": "Look at this"}]
    assert [p.get("text", p.get("path")) for p in records[2]["messages"][0]["content"]] == [
        "Compare ", "../llava_images/coco/1.png", " and", "../llava_images/coco/2.png", "please."]
    # the output is an ordinary record file: every record loads, its images resolve
    loader = MultimodalLoader(read_records(out, streaming=True), processor, max_length=128, batch_size=8, policy="fail")
    [batch] = list(loader)
    assert batch.features["image"].shape == (4 * 4, 192)

    with pytest.raises(BadRecordError, match=r"llava.json\[4\]: malformed_message"):
        convert_llava(src, images, out, policy="fail")


def test_llava_items_with_malformed_images_or_turns_are_bad_records_not_a_crash(tmp_path):
    chat = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A square."}]
    items = [
        {"id": "number", "image": 5, "conversations": chat},
        {"id": "null path", "image": [None], "conversations": chat},
        {"id": "mapping", "image": {"coco/1.png": 1}, "conversations": chat},
        {"id": "null question", "image": "coco/1.png", "conversations": [{"from": "human", "value": None}, chat[1]]},
        {"id": "fine", "image": "coco/1.png", "conversations": chat},
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(items))
    bad = convert_llava(src, tmp_path / "images", tmp_path / "train.jsonl")
    assert [e.where for e in bad.skipped] == [f"{src}[{i}]" for i in range(4)]
    assert bad.summary() == "skipped 4 of 5 records (malformed_message 4)"
    assert "'image' must be a path or a list of paths" in bad.skipped[0].detail
    assert "conversations[0]: expected" in bad.skipped[3].detail
    assert [json.loads(line)["id"] for line in (tmp_path / "train.jsonl").read_text().splitlines()] == ["fine"]


def test_llava_puts_an_unmarked_image_into_the_first_user_turn_whichever_name_it_has(tmp_path):
    item = {"id": "a", "image": "1.png", "conversations": [{"from": "user", "value": "What is it?"},
                                                           {"from": "assistant", "value": "A square."}]}
    (tmp_path / "llava.json").write_text(json.dumps([item]))
    bad = convert_llava(tmp_path / "llava.json", tmp_path, tmp_path / "train.jsonl", policy="fail")
    [record] = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert not bad.skipped
    assert record["messages"][0] == {"role": "user", "content": [{"type": "image", "path": "1.png"},
                                                                 {"type": "text", "text": "What is it?"}]}


def test_meta_must_be_an_object_and_an_id_of_0_is_kept(tmp_path):
    text = {"messages": [{"role": "assistant", "content": [{"type": "text", "text": "Hi."}]}]}
    path = write_jsonl(tmp_path / "r.jsonl", [text | {"id": 0, "meta": {"task": "x"}}, text | {"meta": [1, 2]},
                                              text | {"meta": 5}])
    bad = BadRecords("skip")
    records = list(iter_records(read_records(path, streaming=True), bad))
    assert [r.id for r in records] == ["0"]  # was the file:line location: 0 is falsy
    assert [(e.where, e.reason) for e in bad.skipped] == [(f"{path}:2", "malformed_message"), (f"{path}:3", "malformed_message")]
    assert all("meta must be an object" in e.detail for e in bad.skipped)


def test_a_packed_batch_of_more_rows_than_the_default_buffer_loads(tmp_path, processor):
    # batch_size 1100 failed at the first batch with "buffer_size 1024 must be at least rows 1100"
    png(tmp_path / "media" / "good.png")
    path = write_jsonl(tmp_path / "train.jsonl", [qa({"type": "image", "path": "media/good.png"})] * 3)
    loader = MultimodalLoader(read_records(path, streaming=True), processor, max_length=MAX_LENGTH, batch_size=1100)
    (batch,) = list(loader)  # the last, partial round of rows
    assert loader.bad.seen == 3 and not loader.bad.skipped and batch.input_ids.shape[0] <= 3
