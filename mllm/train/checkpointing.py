"""Step checkpoints (atomic, resumable, safetensors only) and their export to a plain checkpoint.

    <output_dir>/checkpoints/step-00000100/
        recipe.yaml                     the recipe that made it: export rebuilds the model from it
        model.safetensors               every trainable parameter, full and fp32 (gathered under ZeRO-3)
        optimizer/rank-00000.safetensors, .json   optimizer state: tensors, and the structure around them
        rng/rank-00000.json             python, numpy and torch generator states
        trainer.json                    step, data position (epoch, batch), world size, transcribed modalities
        COMPLETE                        written last: only a directory with it is ever read

A save writes everything into `.step-00000100.tmp`, renames it into place and
then writes the marker, so a process killed at any moment leaves the earlier
checkpoints as they were. A checkpoint pruned by `train.keep_last` is renamed
to `.step-00000100.deleting` before it is deleted, so none is ever listed
half-deleted. Frozen weights are not saved: like a LoRA adapter, a checkpoint
is read together with the base its recipe names. Under DeepSpeed each rank
writes its own partition of the optimizer state, so a run resumes on the same
number of ranks.

    export_checkpoint("runs/x/checkpoints/step-00000100", "runs/x/final", merge_lora=True)

writes a plain mllm checkpoint (LoRA merged into the base), which
`AutoModelForCausalLM.from_pretrained` and `mllm.checkpoint.load_checkpoint` load.
"""

from __future__ import annotations

import enum
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mllm.checkpoint import build_model, fsync, fsync_tree, load_checkpoint, publish_directory, save_checkpoint
from mllm.config import ConfigError, save_config, to_dict
from mllm.model import MultimodalLM
from mllm.processor import Processor
from mllm.train.distributed import DistEnv, Engine, barrier
from mllm.train.policy import apply_policy, merge, unwrap
from mllm.train.recipe import FinetuneConfig, load_recipe

COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"step-(\d{8})")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken (skipped ones included)
    epoch: int = 0  # data position of the next step: the epoch ...
    batch: int = 0  # ... and the index of its first micro-batch in that epoch's stream
    world_size: int = 1
    transcribed: list[str] = field(default_factory=list)  # modalities whose slots learned to spell transcripts


# ---- the model a recipe describes ---------------------------------------------------------------


def build_from_recipe(cfg: FinetuneConfig) -> tuple[MultimodalLM, Processor]:
    """The model and processor a recipe starts from, with the recipe's head loss weights set."""
    if cfg.model is not None:
        model, processor = build_model(cfg.model)
    else:
        # a head the recipe makes parallel needs sdpa's block mask, whatever the checkpoint's own heads are
        parallel = any(head.parallel for head in cfg.new_heads.values())
        model, processor = load_checkpoint(cfg.init_from, attn_implementation="sdpa" if parallel else "auto")
    for m, head in cfg.new_heads.items():  # e.g. a diffusion head in place of a GMM head, on the same LM
        if m not in model.config.heads:
            raise ConfigError(f"new_heads.{m}", f"the model has no head for it (heads: {sorted(model.config.heads)})")
        torch.manual_seed(cfg.train.seed)
        model.replace_head(m, to_dict(head))
    for m, weight in cfg.loss.heads.items():
        if m not in model.config.heads:
            raise ConfigError(f"loss.heads.{m}", f"the model has no head for it (heads: {sorted(model.config.heads)})")
        model.config.heads[m]["loss_weight"] = weight  # the model sums its loss with these; config.json records them
    return model.train(), processor


# ---- saving -------------------------------------------------------------------------------------


def step_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints under output_dir, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if STEP_DIR.fullmatch(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_step(engine: Engine, env: DistEnv, cfg: FinetuneConfig, state: TrainerState) -> Path:
    """Write a step checkpoint atomically (every rank calls this); returns its directory."""
    final = step_dir(cfg.output_dir, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    if env.is_main:
        for leftover in [tmp, *final.parent.glob(".step-*.deleting")]:  # a save or a deletion killed earlier
            shutil.rmtree(leftover, ignore_errors=True)
        _delete_dir(final)  # renamed in but never marked complete
        tmp.mkdir(parents=True)
    barrier()
    weights = engine.trainable_state()
    if env.is_main:
        _write_tensors(tmp / "model.safetensors", weights, {"format": "mllm-trainable"})
        save_config(cfg, tmp / "recipe.yaml")
        _write_json(tmp / "trainer.json", asdict(state))
    if env.is_main or engine.shards_optimizer_state:
        write_state(tmp / "optimizer" / f"rank-{env.rank:05d}", engine.optimizer_state())
    _write_json(tmp / "rng" / f"rank-{env.rank:05d}.json", rng_state())
    barrier()
    if env.is_main:
        fsync_tree(tmp)
        os.replace(tmp, final)
        _write_json(final / COMPLETE, {"step": state.step})
        fsync(final.parent)
        for old in complete_checkpoints(cfg.output_dir)[: -cfg.train.keep_last]:
            _delete_dir(old)
    barrier()
    return final


# ---- resuming -----------------------------------------------------------------------------------


def read_trainer_state(ckpt: Path) -> TrainerState:
    return TrainerState(**json.loads((ckpt / "trainer.json").read_text()))


def load_trainable(model: nn.Module, ckpt: str | os.PathLike) -> None:
    """Put a checkpoint's trainable weights into a model wrapped by the same policy; names must match exactly."""
    tensors = load_file(Path(ckpt) / "model.safetensors")
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{ckpt}: its trainable weights do not fit this model and policy "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)


def load_optimizer(engine: Engine, env: DistEnv, ckpt: Path, state: TrainerState) -> None:
    if engine.shards_optimizer_state and state.world_size != env.world_size:
        raise ValueError(f"{ckpt}: saved by {state.world_size} ranks, resumed by {env.world_size}: "
                         "DeepSpeed partitions the optimizer state, so resume on the same number of ranks")
    rank = env.rank if engine.shards_optimizer_state else 0
    engine.load_optimizer_state(read_state(ckpt / "optimizer" / f"rank-{rank:05d}"))


def load_rng(ckpt: Path, env: DistEnv) -> None:
    path = ckpt / "rng" / f"rank-{env.rank:05d}.json"
    if path.is_file():  # a run on more ranks than the checkpoint's keeps the fresh seeds of the new ones
        set_rng_state(json.loads(path.read_text()))


# ---- export -------------------------------------------------------------------------------------


def export_checkpoint(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    merge_lora: bool = True,
    what: Literal["merged", "language_model"] = "merged",
) -> Path:
    """A step checkpoint -> a plain directory: the whole mllm checkpoint (LoRA and token rows merged),
    or, with what="language_model", only the LM and its tokenizer (the `model.base` of a next stage)."""
    ckpt = Path(ckpt)
    if not (ckpt / COMPLETE).is_file():
        raise FileNotFoundError(f"{ckpt}: not a complete step checkpoint (no {COMPLETE} marker)")
    cfg = load_recipe(ckpt / "recipe.yaml")
    model, processor = build_from_recipe(cfg)
    trained = apply_policy(model, cfg.policy)
    load_trainable(trained, ckpt)
    if trained is not unwrap(trained) and not merge_lora:
        raise ValueError(f"{ckpt}: holds LoRA or token-row weights; export them merged into the base (--merge)")
    model = merge(trained).requires_grad_(False).eval()
    model.config.transcribed = sorted(set(model.config.transcribed) | set(read_trainer_state(ckpt).transcribed))
    if what == "merged":
        return save_checkpoint(model, processor, out)
    return _save_language_model(model, processor, Path(out))


def _save_language_model(model: MultimodalLM, processor: Processor, out: Path) -> Path:
    """Write the LM and its tokenizer into `out` atomically: the old `out` stays whole until the new one is in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # of an export killed earlier
    model.language_model.save_pretrained(tmp)
    processor.tokenizer.save_pretrained(tmp)
    publish_directory(tmp, out)
    return out


# ---- state files: safetensors for tensors, JSON for everything around them ----------------------


def write_state(prefix: Path, state: Any) -> None:
    """`prefix.safetensors` holds every tensor of `state`; `prefix.json` the structure, naming them."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors)
    _write_tensors(prefix.with_suffix(".safetensors"), tensors)
    _write_json(prefix.with_suffix(".json"), structure)


def read_state(prefix: Path) -> Any:
    tensors = load_file(prefix.with_suffix(".safetensors"))
    return _decode(json.loads(prefix.with_suffix(".json").read_text()), tensors)


def _encode(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for `x`; tensors go into `tensors`. Dicts keep key types, tuples stay tuples."""
    if torch.is_tensor(x):
        key = str(len(tensors))
        tensors[key] = x.detach().to("cpu", copy=True).contiguous()
        return {"tensor": key}
    if isinstance(x, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"tuple": [_encode(v, tensors) for v in x]}
    if isinstance(x, list):
        return [_encode(v, tensors) for v in x]
    if isinstance(x, enum.Enum):
        return _encode(x.value, tensors)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot save a {type(x).__name__} in a state file")


def _decode(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    if isinstance(x, dict):
        (kind, value), = x.items()
        if kind == "tensor":
            return tensors[value]
        if kind == "tuple":
            return tuple(_decode(v, tensors) for v in value)
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    return x


def rng_state() -> dict:
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=metadata)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _delete_dir(path: Path) -> None:
    """Rename `path` to a hidden `.<name>.deleting` sibling, then delete that: a kill mid-way leaves no directory
    under the old name with some of its files gone (a checkpoint marked COMPLETE without its weights)."""
    doomed = path.with_name(f".{path.name}.deleting")
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    fsync(path.parent)
    shutil.rmtree(doomed)
