"""A complete mllm checkpoint: built from a config, saved and loaded as one directory.

    model, processor = build_model(ModelConfig(base="path/to/Mistral-7B", media={...}))
    save_checkpoint(model, processor, "runs/x/checkpoint")   # atomic: `.checkpoint.tmp-<pid>`, then rename
    model, processor = load_checkpoint("runs/x/checkpoint")

The directory holds `config.json` + `model.safetensors` (the LM with its grown
vocabulary, the projectors and the output heads), the tokenizer files, `mllm_processor.json`
(vocabulary layout, chat template), `media_tokenizers/<modality>/` and `detokenizers/<modality>/`.
Nothing is pickled and nothing needs remote code.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import is_flash_attn_2_available

from mllm.config import to_dict
from mllm.detokenizers import DeTokenizer, load_detokenizer
from mllm.files import process_gone
from mllm.model import MultimodalLM
from mllm.model.modeling import refuse_flash_attention
from mllm.processor import Processor
from mllm.tokenizers import MediaTokenizer, build_media_tokenizer, load_media_tokenizer
from mllm.vocab import ModalitySpec

DETOKENIZERS_DIR = "detokenizers"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MediaConfig:
    """One modality: a media tokenizer by registry name (+ options) or a saved directory, or,
    for media that only ever arrive pre-encoded, just the token spec."""

    tokenizer: str | None = None  # registry name, see mllm.tokenizers.list_media_tokenizers()
    options: dict[str, Any] = field(default_factory=dict)
    path: str | None = None  # a directory written by MediaTokenizer.save_pretrained
    kind: Literal["discrete", "continuous"] | None = None  # pre-encoded only
    codebook_size: int = 0
    feature_dim: int = 0
    tokens_per_item: int = 0  # N tokens the model writes per item; 0: discrete spans end when the model says so

    def __post_init__(self):
        sources = [s for s in (self.tokenizer, self.path, self.kind) if s]
        if len(sources) != 1:
            raise ValueError("a media entry needs exactly one of 'tokenizer', 'path' or 'kind'")
        if self.tokens_per_item < 0:
            raise ValueError(f"tokens_per_item must be >= 0, got {self.tokens_per_item}")


@dataclass
class HeadConfig:
    """The output head of one continuous modality: a registry name (see mllm.heads.list_heads()) + options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)  # the head's config, less hidden_size/feature_dim
    loss_weight: float = 1.0  # λ in CE + λ · head loss
    parallel: bool = False  # Divot-style: a whole item per forward pass, its queries attending to each other


@dataclass
class ModelConfig:
    base: str | None = None  # local HF causal-LM directory (pretrained weights)
    base_config: dict[str, Any] | None = None  # or an HF config dict: a randomly initialised LM
    tokenizer: str | None = None  # local tokenizer directory; defaults to `base`
    chat_template: str = "plain"
    media: dict[str, MediaConfig] = field(default_factory=dict)
    heads: dict[str, HeadConfig] = field(default_factory=dict)  # continuous modality -> its output head
    projector: str | dict[str, str] = "mlp2x_gelu"  # one for all continuous modalities, or one each
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA if installed, else (and with a parallel head) sdpa
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_length: int | None = None
    seed: int = 0

    def __post_init__(self):
        if (self.base is None) == (self.base_config is None):
            raise ValueError("set exactly one of 'base' (a pretrained LM directory) and 'base_config'")
        if self.base is None and self.tokenizer is None:
            raise ValueError("'tokenizer' is required when the LM is built from 'base_config'")
        missing = sorted(set(self.heads) - set(self.media))
        if missing:
            raise ValueError(f"heads.{missing[0]}: no such modality in 'media' (has: {sorted(self.media)})")


def resolve_attn_implementation(name: str, parallel: list[str] | None = None) -> str:
    """`name`, or for "auto" flash_attention_2 on CUDA when installed, else sdpa. `parallel`: the modalities whose
    heads are parallel; their queries need a 4D attention mask, which flash attention cannot take, so "auto" is then
    sdpa and an explicit flash attention an error."""
    if name != "auto":
        refuse_flash_attention(name, parallel or [])
        return name
    return "flash_attention_2" if not parallel and flash_attention_available() else "sdpa"


def flash_attention_available() -> bool:
    return torch.cuda.is_available() and is_flash_attn_2_available()


def build_media_tokenizers(cfg: ModelConfig) -> tuple[dict[str, MediaTokenizer], list[ModalitySpec]]:
    """The media tokenizers a model config names (loaded from their directories or built from their options),
    and the specs of the modalities it names by kind only. Seeds torch with `cfg.seed` first: `build_model`'s
    first step, so a built tokenizer comes out the same here as in the model."""
    torch.manual_seed(cfg.seed)
    media_tokenizers, specs = {}, []
    for name, m in cfg.media.items():
        if m.kind:
            specs.append(ModalitySpec(name, m.kind, codebook_size=m.codebook_size, feature_dim=m.feature_dim))
        else:
            media_tokenizers[name] = load_media_tokenizer(m.path) if m.path else build_media_tokenizer(m.tokenizer, m.options)
    return media_tokenizers, specs


def build_model(cfg: ModelConfig) -> tuple[MultimodalLM, Processor]:
    """A new model and processor: the base LM with its vocabulary grown for every modality."""
    media_tokenizers, specs = build_media_tokenizers(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.base)
    processor = Processor.create(tokenizer, cfg.chat_template, media_tokenizers, specs, cfg.max_length)
    parallel = [name for name, head in cfg.heads.items() if head.parallel]
    attn = resolve_attn_implementation(cfg.attn_implementation, parallel)
    if cfg.base is not None:
        base = AutoModelForCausalLM.from_pretrained(cfg.base, dtype=DTYPES[cfg.dtype], attn_implementation=attn)
    else:
        text = dict(cfg.base_config)
        text_config = AutoConfig.for_model(text.pop("model_type"), **text)
        base = AutoModelForCausalLM.from_config(text_config, dtype=DTYPES[cfg.dtype], attn_implementation=attn)
    model = MultimodalLM.from_base(
        base,
        processor.layout,
        projector=cfg.projector,
        heads={name: to_dict(head) for name, head in cfg.heads.items()},
        tokens_per_item={name: m.tokens_per_item for name, m in cfg.media.items() if m.tokens_per_item},
    )
    return model.to(DTYPES[cfg.dtype]), processor


def save_checkpoint(
    model: MultimodalLM,
    processor: Processor,
    path: str | os.PathLike,
    detokenizers: dict[str, DeTokenizer] | None = None,
) -> Path:
    """Write model, processor and de-tokenizers into `path` atomically: a reader sees the old or the new
    checkpoint, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        for name, detokenizer in (detokenizers or {}).items():
            detokenizer.save_pretrained(tmp / DETOKENIZERS_DIR / name)
        publish_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def remove_stale_tmp(path: Path) -> None:
    """Delete the `.<name>.tmp-<pid>` siblings of `path` that saves killed mid-way left: those whose process is
    gone, and this process's own (a pid the system gave again after such a kill)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        if int(pid) == os.getpid() or process_gone(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def publish_directory(tmp: Path, path: Path) -> None:
    """Put the complete directory `tmp` (a sibling) in place of `path`: flushed to disk first, so the rename
    publishes whole files; the old copy moves aside to `.<name>.old`, then goes. If the second rename fails the
    old copy goes back; a kill between the two renames leaves it, whole, and the next publish of `path` puts it
    back before replacing it."""
    fsync_tree(tmp)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():  # a publish killed between its renames
        os.replace(old, path)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old.exists():
            os.replace(old, path)
        raise
    fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync(path: Path) -> None:
    """Flush a file or a directory (its entries: renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync(Path(dirpath) / name)
        fsync(Path(dirpath))


def load_checkpoint(
    path: str | os.PathLike, *, dtype: str | None = None, attn_implementation: str = "auto", device: str | None = None
) -> tuple[MultimodalLM, Processor]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    dtype = dtype or config.get("dtype")  # as trained, however the weights are stored
    parallel = [name for name, head in config.get("heads", {}).items() if head.get("parallel")]
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=DTYPES.get(dtype),
        attn_implementation=resolve_attn_implementation(attn_implementation, parallel),
    )
    if not isinstance(model, MultimodalLM):
        raise ValueError(f"{path}: holds a {type(model).__name__}, not an mllm checkpoint")
    if device is not None:
        model = model.to(device)
    return model.eval(), Processor.from_pretrained(path)


def load_detokenizers(path: str | os.PathLike) -> dict[str, DeTokenizer]:
    """The de-tokenizers saved with a checkpoint, by modality (none if it has none)."""
    root = Path(path) / DETOKENIZERS_DIR
    if not root.is_dir():
        return {}
    return {d.name: load_detokenizer(d) for d in sorted(root.iterdir()) if d.is_dir()}
