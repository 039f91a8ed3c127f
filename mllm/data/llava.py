"""Convert a LLaVA-style instruction file to mllm records (JSONL).

LLaVA's format is one JSON list:

    [{"id": "000001", "image": "coco/000001.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                        {"from": "gpt", "value": "A red cup."}]}]

Each item becomes one record whose image part sits where its `<image>` marker
was (the newline next to a marker is dropped with it); an item with an image
but no marker gets it at the start of the first human (or "user") turn, as LLaVA does.
`"image"` may also be a list, one path per marker, in order. Image paths are
taken relative to `image_folder` and written relative to the output file, so
the records work wherever the two folders move together.

    python -m mllm.data.llava llava_instruct.json --image-folder images/ --out data/llava/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path

from mllm.data.records import BadRecordError, BadRecordPolicy, BadRecords

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MARKER = re.compile(r"\n?<image>\n?")  # a marker with the newline on either side of it


def convert_item(item: dict, image_folder: str | os.PathLike, out_dir: str | os.PathLike, corpus: str = "llava") -> dict:
    """One LLaVA item -> one record (a dict, see `mllm.data.records`). Raises ValueError when malformed."""
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list) or not item["conversations"]:
        raise ValueError("an item needs a non-empty 'conversations' list")
    images = item.get("image") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError("'image' must be a path or a list of paths")
    paths = [os.path.relpath(Path(image_folder) / p, out_dir) for p in images]
    turns = item["conversations"]
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"conversations[{i}]: expected {{'from': one of {sorted(ROLES)}, 'value': text}}")
    markers = sum(t["value"].count(IMAGE_MARKER) for t in turns)
    if markers == 0 and paths:
        first_human = next((i for i, t in enumerate(turns) if ROLES[t["from"]] == "user"), None)
        if first_human is None:
            raise ValueError("the item has an image but no human turn to put it in")
        turns = [dict(t) for t in turns]
        turns[first_human]["value"] = IMAGE_MARKER + "\n" + turns[first_human]["value"]
        markers = len(paths)
    if markers != len(paths):
        raise ValueError(f"{markers} {IMAGE_MARKER} markers for {len(paths)} images")
    messages, next_image = [], iter(paths)
    for turn in turns:
        content = []
        for k, piece in enumerate(_MARKER.split(turn["value"])):
            if k > 0:
                content.append({"type": "image", "path": next(next_image)})
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": ROLES[turn["from"]], "content": content})
    record_id = str(item.get("id", ""))
    return {"id": record_id, "corpus": corpus, "task": "instruction", "messages": messages, "meta": {"source_id": record_id}}


def convert_llava(
    src: str | os.PathLike,
    image_folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    policy: BadRecordPolicy = "skip",
    corpus: str = "llava",
) -> BadRecords:
    """Convert LLaVA JSON `src` into JSONL `out` (written atomically). Returns the report of skipped items,
    each named `src[index]`; with policy "fail" the first bad item raises BadRecordError."""
    src, out = Path(src), Path(out)
    items = json.loads(src.read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise ValueError(f"{src}: a LLaVA file is a JSON list of items, got {type(items).__name__}")
    out.parent.mkdir(parents=True, exist_ok=True)
    bad, written = BadRecords(policy), 0
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for index, item in enumerate(items):
                bad.seen += 1
                try:
                    record = convert_item(item, image_folder, out.parent, corpus)
                except ValueError as e:
                    bad(BadRecordError("malformed_message", f"{src}[{index}]", str(e)))
                    continue
                record["id"] = record["id"] or f"{corpus}-{index:06d}"
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("converted %d of %d items from %s into %s; %s", written, len(items), src, out, bad.summary())
    return bad


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="LLaVA-style instruction JSON file")
    parser.add_argument("--image-folder", required=True, help="folder the items' image paths are relative to")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--on-bad-record", choices=["skip", "fail"], default="skip")
    parser.add_argument("--corpus", default="llava", help="value of each record's 'corpus' field")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    convert_llava(args.src, args.image_folder, args.out, policy=args.on_bad_record, corpus=args.corpus)


if __name__ == "__main__":
    main()
