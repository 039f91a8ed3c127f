"""The real data and tokenizers that the packing, cache and memory sections read.

The built-in corpora (`mllm data build`, $MLLM_CACHE/corpora) when given and built by this mllm, else
data/build_small.yaml built into the work folder (under a minute). Text goes through the
Mistral v1 SentencePiece tokenizer shipped in the mistral-common wheel; images through raw
patches; audio and video through the first registered tokenizer of each that builds
with default options. Records whose media have no tokenizer are left out.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets

from mllm.bench.settings import Settings
from mllm.checkpoint import MediaConfig, ModelConfig, build_model
from mllm.data.cache import TokenCache
from mllm.data.corpora.build import build_corpora, is_current
from mllm.data.records import read_records
from mllm.model import MultimodalLM
from mllm.processor import Processor
from mllm.tokenizers import build_media_tokenizer, list_media_tokenizers
from mllm.tokenizers.base import MEDIA_TOKENIZERS

TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048)
SMALL_BUILD = Path(__file__).resolve().parents[2] / "data" / "build_small.yaml"


def corpora(data: Path | None, work: Path) -> Path:
    if data is not None and is_current(data):
        return data
    out = work / "corpora"
    if not is_current(out):  # an older mllm's build has other records
        print(f"bench: no corpora of this mllm at {data}; building {SMALL_BUILD.name} into {out}", flush=True)
        build_corpora(SMALL_BUILD, out, progress=False, overwrite=True)
    return out


def mistral_tokenizer(work: Path) -> Path:
    """The Mistral v1 SentencePiece tokenizer from the mistral-common wheel, as a HF tokenizer directory."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        raise RuntimeError("mistral-common is not installed: pip install --no-deps 'mistral-common>=1.5,<2'")
    out = work / "mistral_tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(spec.origin).parent / "data" / "tokenizer.model.v1", out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    return out


def media_configs() -> dict[str, MediaConfig]:
    """image: raw patches; audio and video: the first registered tokenizer that builds with defaults."""
    media = {"image": MediaConfig(tokenizer="patch", options={"image_size": 32, "patch_size": 8})}
    for modality in ("audio", "video"):
        for name in list_media_tokenizers():
            if MEDIA_TOKENIZERS.get(name).modality != modality:
                continue
            try:
                build_media_tokenizer(name)
            except Exception:  # noqa: BLE001 - e.g. one that needs weights: try the next
                continue
            media[modality] = MediaConfig(tokenizer=name)
            break
    return media


def media_types(row: dict) -> set[str]:
    """The media types a row uses; none for a row that is not well formed (the loader reports it)."""
    if row["error"]:
        return set()
    messages = json.loads(row["messages"])
    messages = messages if isinstance(messages, list) else []
    parts = [p for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list) for p in m["content"]]
    return {p["type"] for p in parts if isinstance(p, dict) and p.get("type", "text") != "text"}


def train_rows(root: Path, modalities: set[str], limit: int, work: Path) -> list[dict]:
    """Up to `limit` shuffled train rows of every corpus whose media all have a tokenizer."""
    rows = read_records(sorted(root.glob("*/train.jsonl")), cache_dir=work / "hf").shuffle(seed=0)
    kept = [row for row in rows if media_types(row) <= modalities]
    return kept[:limit]


@dataclass
class RealData:
    """The built corpora's usable train rows with a model, its processor and a warm token cache."""

    rows: list[dict]
    model: MultimodalLM
    processor: Processor
    cache: TokenCache


def real_data(s: Settings, samples: int) -> RealData:
    datasets.disable_progress_bars()
    root = corpora(s.data, s.work)
    cfg = ModelConfig(base_config=TINY_LLAMA, tokenizer=str(mistral_tokenizer(s.work)),
                      media=media_configs())
    model, processor = build_model(cfg)
    rows = train_rows(root, set(processor.media_tokenizers), samples, s.work)
    cache = TokenCache(s.work / "tokens", processor.media_tokenizers)
    cache.encode_records(rows, progress=False)
    return RealData(rows, model, processor, cache)
