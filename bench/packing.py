"""Packing benchmark: share of real tokens, and training throughput of packed over pad-to-longest.

    python bench/packing.py                      # builds data/build_small.yaml into a temp dir
    python bench/packing.py --data data/corpora  # or reads an `mllm data build` output

The train split of every built-in corpus goes through the real pipeline
(records -> token cache -> processor -> packed or padded batches) into a tiny
Llama built by `build_model`. Both kinds of batch are built from the same
samples, then train steps (forward, backward, AdamW) run on them, alternating
packed and padded passes in one process. Throughput counts real tokens only.
Targets: non-pad share of packed batches >= 0.95; packed/padded throughput >= 1.5x.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch

from mllm.checkpoint import MediaConfig, ModelConfig, build_model
from mllm.data.cache import TokenCache
from mllm.data.corpora.build import build_corpora, is_complete
from mllm.data.loader import MultimodalLoader
from mllm.data.records import read_records
from mllm.tokenizers import build_media_tokenizer, list_media_tokenizers
from mllm.tokenizers.base import MEDIA_TOKENIZERS

REPO = Path(__file__).resolve().parents[1]
SHARE_TARGET, SPEEDUP_TARGET = 0.95, 1.5
TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048)


def corpora_dir(data: str | None, tmp: Path) -> Path:
    if data and is_complete(data):
        return Path(data)
    if data:
        print(f"{data} holds no complete build (no manifest.json); building data/build_small.yaml instead")
    out = tmp / "corpora"
    build_corpora(REPO / "data" / "build_small.yaml", out, progress=False)
    return out


def mistral_tokenizer(tmp: Path) -> Path:
    """The Mistral v1 SentencePiece tokenizer shipped in the mistral-common wheel, as a HF directory."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        sys.exit("mistral-common is not installed: pip install --no-deps 'mistral-common>=1.5,<2'")
    out = tmp / "tokenizer"
    out.mkdir()
    shutil.copy(Path(spec.origin).parent / "data" / "tokenizer.model.v1", out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    return out


def media_configs() -> dict[str, MediaConfig]:
    """image: the patch tokenizer; audio and video: the first registered tokenizer that builds with defaults."""
    media = {"image": MediaConfig(tokenizer="patch", options={"image_size": 32, "patch_size": 8})}
    for modality in ("audio", "video"):
        for name in list_media_tokenizers():
            if MEDIA_TOKENIZERS.get(name).modality != modality:
                continue
            try:
                build_media_tokenizer(name)
            except Exception as e:  # noqa: BLE001 - e.g. one that needs weights; say so and try the next
                print(f"{modality}: tokenizer '{name}' does not build with default options ({e})")
                continue
            media[modality] = MediaConfig(tokenizer=name)
            break
    return media


def usable(rows, modalities: set[str]) -> tuple[list[dict], int]:
    """The rows whose media all have a tokenizer, and how many others there were."""
    kept = [row for row in rows if media_types(row) <= modalities]
    return kept, len(rows) - len(kept)


def media_types(row: dict) -> set[str]:
    """The media types a row uses; none for a row that is not well formed (the loader reports it)."""
    if row["error"]:
        return set()
    messages = json.loads(row["messages"])
    messages = messages if isinstance(messages, list) else []
    parts = [p for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list) for p in m["content"]]
    return {p["type"] for p in parts if isinstance(p, dict) and p.get("type", "text") != "text"}


def train_pass(model, optimizer, batches) -> float:
    start = time.perf_counter()
    for batch in batches:
        loss = model(**batch.model_inputs()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="an `mllm data build` output directory (default: build data/build_small.yaml)")
    parser.add_argument("--samples", type=int, default=512, help="samples in the benchmark set")
    parser.add_argument("--max-length", type=int, default=512, help="length of a packed row")
    parser.add_argument("--rows", type=int, default=2, help="packed rows per batch")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per pad-to-longest batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each kind")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()

    with tempfile.TemporaryDirectory(prefix="mllm-bench-") as tmp:
        tmp = Path(tmp)
        root = corpora_dir(args.data, tmp)
        cfg = ModelConfig(base_config=TINY_LLAMA, tokenizer=str(mistral_tokenizer(tmp)), media=media_configs())
        model, processor = build_model(cfg)
        attn = model.language_model.config._attn_implementation
        for modality in ("audio", "video"):
            if modality not in processor.media_tokenizers:
                print(f"{modality}: no tokenizer in mllm.tokenizers, so records with {modality} are left out")

        files = sorted(root.glob("*/train.jsonl"))
        rows = read_records(files, cache_dir=tmp / "hf").shuffle(seed=0)
        rows, left_out = usable(rows, set(processor.media_tokenizers))
        print(f"records: {len(rows)} usable in {', '.join(f.parent.name for f in files)} "
              f"({left_out} left out for media without a tokenizer); the first {min(args.samples, len(rows))} are used")
        rows = rows[: args.samples]
        cache = TokenCache(tmp / "tokens", processor.media_tokenizers)
        cache.encode_records(rows, progress=False)

        common = dict(max_length=args.max_length, cache=cache, attn_implementation=attn)
        packed_loader = MultimodalLoader(rows, processor, batch_size=args.rows, packing=True, **common)
        padded_loader = MultimodalLoader(rows, processor, batch_size=args.batch_size, packing=False, **common)
        packed, padded = list(packed_loader), list(padded_loader)
        print(f"bad records: {packed_loader.bad.summary()}")
        tokens = sum(len(s) for s in packed_loader.samples())  # real tokens, the same in both kinds of batch
        assert tokens == sum(int(b.attention_mask.sum()) for b in padded)
        packed_share = tokens / sum(b.input_ids.numel() for b in packed)
        padded_share = tokens / sum(b.input_ids.numel() for b in padded)
        print(f"tokens: {tokens} real in {len(packed)} packed batches of {args.rows}x{args.max_length} "
              f"and {len(padded)} padded batches of {args.batch_size} samples; attention: {attn}")

        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        train_pass(model, optimizer, packed[:2] + padded[:2])  # warm-up
        times = {"packed": [], "padded": []}
        for r in range(args.repeats):
            order = ("packed", "padded") if r % 2 == 0 else ("padded", "packed")
            for kind in order:
                times[kind].append(train_pass(model, optimizer, packed if kind == "packed" else padded))

    speed = {k: tokens / statistics.median(t) for k, t in times.items()}
    print()
    print(f"non-pad share   packed {packed_share:.3f}   pad-to-longest {padded_share:.3f}")
    for kind, t in times.items():
        print(f"train pass      {kind:<7} min {min(t):.2f} s  median {statistics.median(t):.2f} s  "
              f"-> {speed[kind]:,.0f} real tokens/s (median)")
    ratio = speed["packed"] / speed["padded"]
    best = min(times["padded"]) / min(times["packed"])
    print(f"throughput      packed / pad-to-longest = {ratio:.2f}x (medians), {best:.2f}x (minima)")
    print()
    print(f"target non-pad share >= {SHARE_TARGET}: {'met' if packed_share >= SHARE_TARGET else 'NOT met'} ({packed_share:.3f})")
    print(f"target speed-up >= {SPEEDUP_TARGET}x: {'met' if ratio >= SPEEDUP_TARGET else 'NOT met'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
