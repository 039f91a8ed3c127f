"""Finetuning recipes: one typed YAML file per stage, checked before any work starts.

    cfg = load_recipe("finetune/recipes/mm_pretrain.yaml", ["train.max_steps=50", "policy.lora.r=8"])
    check_ready(cfg)        # files exist, the DeepSpeed config fits the recipe
    finetune(cfg)           # mllm.train.loop

A recipe names the model (`model`, an `mllm.checkpoint.ModelConfig`, or
`init_from`, a checkpoint an earlier stage exported), the data, the
trainable-parameter policy, the optimiser and schedule, the loss weights and
the run (steps, accumulation, precision, checkpoints). `deepspeed` names a
DeepSpeed JSON file; without one the run is plain PyTorch (DDP under torchrun).

DeepSpeed keys set to "auto" are filled from the recipe, as the Hugging Face
integration fills them from TrainingArguments; a key set to a value that
disagrees with the recipe is an error, so the two never drift apart.

Relative paths are relative to the current directory; record paths are
relative to `data.root` (default: the built corpora, `$MLLM_CACHE/corpora`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mllm.checkpoint import HeadConfig, ModelConfig
from mllm.config import ConfigError, load_config
from mllm.data.cache import bad_batch_sizes
from mllm.data.input_augment import InputAugmentConfig
from mllm.data.records import NoRecordsError, empty_record_files, record_files
from mllm.data.sources import cache_dir

Precision = Literal["auto", "bf16", "fp32"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TextTokenizerConfig:
    """Train a SentencePiece text tokenizer into `model.tokenizer` first, unless that directory exists."""

    records: list[str]  # record files (relative to data.root) whose text it learns from
    vocab_size: int = 1000
    max_texts: int = 200_000


@dataclass
class DataConfig:
    train: list[str]  # record files, directories or globs (JSONL/Parquet), relative to `root`
    validation: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)  # keep only records of these tasks (the record's "task"); empty: all
    repeat: dict[str, float] = field(default_factory=dict)  # task -> times each record comes per epoch: 3 up-, 0.5 down-samples, 0 leaves out
    repeat_default: float = 1.0  # the rate of every task `repeat` does not name
    root: str | None = None  # None: the built corpora, $MLLM_CACHE/corpora
    max_length: int = 1024
    batch_size: int = 8  # rows per micro-batch and rank: packed rows of max_length, or padded samples
    packing: bool = True
    bad_records: Literal["skip", "fail"] = "skip"
    cache_dir: str | None = None  # record tables and encoded media are cached here; None: <output_dir>/cache
    # modality -> media per tokenizer call when filling the token cache (default 1, one at a time): faster, on a
    # GPU far faster, but a batch may change a tokenizer's last bits
    encode_batch: dict[str, int] = field(default_factory=dict)
    augment: InputAugmentConfig = field(default_factory=InputAugmentConfig)  # of the train records' user media

    def __post_init__(self):
        bad = {task: r for task, r in self.repeat.items() if isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 0}
        if bad:
            raise ValueError(f"data.repeat: each rate must be a number >= 0, got {bad}")
        if not self.repeat_default >= 0:
            raise ValueError(f"data.repeat_default must be >= 0, got {self.repeat_default}")
        if bad := bad_batch_sizes(self.encode_batch):
            raise ValueError(f"data.encode_batch: each batch size must be a whole number >= 1, got {bad}")


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # module names inside the LM


@dataclass
class PolicyConfig:
    """Which parameters train. `train` and `freeze` are globs over MultimodalLM parameter
    names (`heads.image.*`, `language_model.model.layers.0.*`); each must match something."""

    lm: Literal["lora", "full", "frozen"] = "lora"  # what happens to the language model's own weights
    lora: LoraConfig = field(default_factory=LoraConfig)
    new_token_rows: bool = True  # train the embedding (and output) rows of the added media tokens
    projectors: bool = True  # train the input projectors fully
    heads: bool = True  # train the output heads fully
    train: list[str] = field(default_factory=list)  # more parameters trained fully
    freeze: list[str] = field(default_factory=list)  # frozen, whatever the rest says


@dataclass
class OptimConfig:
    """AdamW."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # not applied to biases and norms
    max_grad_norm: float = 1.0  # 0: no clipping


@dataclass
class ScheduleConfig:
    """Linear warm-up to optim.lr, then cosine decay to min_lr_ratio · lr at train.max_steps."""

    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class LossConfig:
    lm: float = 1.0  # weight of the cross-entropy over text and discrete codes
    heads: dict[str, float] = field(default_factory=dict)  # modality -> λ of its output head (default: the model's)
    transcripts: float = 0.0  # weight of the CTC of transcribed input media (their parts' "transcript"); 0: off


@dataclass
class TrainConfig:
    max_steps: int
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    precision: Precision = "auto"  # auto: bf16 on a GPU that has it, fp32 on CPU
    seed: int = 0
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 2  # complete checkpoints kept
    eval_every: int = 0  # steps between validation passes; 0: none
    eval_batches: int = 20  # micro-batches per validation pass (all ranks together)
    max_bad_steps: int = 3  # this many non-finite steps in a row abort the run
    resume: bool = True  # continue from the latest complete checkpoint in output_dir
    tensorboard: bool = True
    export: Literal["merged", "language_model", "none"] = "merged"  # what <output_dir>/final holds


@dataclass
class FinetuneConfig:
    data: DataConfig
    train: TrainConfig
    output_dir: str
    model: ModelConfig | None = None  # build a new model ...
    init_from: str | None = None  # ... or start from an exported checkpoint
    new_heads: dict[str, HeadConfig] = field(default_factory=dict)  # with init_from: these heads replaced by new ones
    text_tokenizer: TextTokenizerConfig | None = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    deepspeed: str | None = None  # a DeepSpeed JSON config; None: plain PyTorch

    def __post_init__(self):
        validate(self)


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> FinetuneConfig:
    """Read a recipe and its dotted overrides; raises ConfigError naming the key and file."""
    try:
        return load_config(FinetuneConfig, path, overrides)
    except ConfigError as e:
        if e.source is None:  # raised by `validate`, which does not know the file
            raise ConfigError(e.key, e.reason, str(path)) from e
        raise


def validate(cfg: FinetuneConfig) -> None:
    """Check the values agree with each other. Touches no file (see `check_ready`)."""
    if (cfg.model is None) == (cfg.init_from is None):
        raise ConfigError("model", "set exactly one of 'model' (build a new model) and 'init_from' (a checkpoint)")
    if cfg.new_heads and cfg.init_from is None:
        raise ConfigError("new_heads", "replaces heads of the 'init_from' checkpoint: a new 'model' names its heads itself")
    if cfg.text_tokenizer is not None and (cfg.model is None or cfg.model.base_config is None):
        raise ConfigError("text_tokenizer", "needs 'model.base_config' and 'model.tokenizer': it trains the tokenizer of a new LM")
    _positive(cfg, "data.max_length", "data.batch_size", "train.max_steps", "train.grad_accum", "train.keep_last",
              "train.max_bad_steps", "train.eval_batches")
    if not cfg.data.train:
        raise ConfigError("data.train", "name at least one record file")
    if cfg.train.eval_every and not cfg.data.validation:
        raise ConfigError("train.eval_every", "needs data.validation records")
    for key in ("train.save_every", "train.eval_every", "schedule.warmup_steps", "optim.weight_decay",
                "optim.max_grad_norm", "loss.lm", "loss.transcripts"):
        if not _get(cfg, key) >= 0:  # NaN too
            raise ConfigError(key, f"must be >= 0, got {_get(cfg, key)}")
    if cfg.schedule.warmup_steps > cfg.train.max_steps:
        raise ConfigError("schedule.warmup_steps", f"{cfg.schedule.warmup_steps} is more than train.max_steps {cfg.train.max_steps}")
    if not 0 <= cfg.schedule.min_lr_ratio <= 1:
        raise ConfigError("schedule.min_lr_ratio", f"must be in [0, 1], got {cfg.schedule.min_lr_ratio}")
    for key in ("optim.lr", "optim.eps"):
        if not 0 < _get(cfg, key) < math.inf:
            raise ConfigError(key, f"must be > 0 and finite, got {_get(cfg, key)}")
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError("optim.betas", f"each must be in [0, 1), got {list(cfg.optim.betas)}")
    lora = cfg.policy.lora
    if cfg.policy.lm == "lora" and (lora.r <= 0 or not lora.target_modules or not 0 <= lora.dropout < 1):
        raise ConfigError("policy.lora", f"needs r > 0, target_modules and dropout in [0, 1); got r={lora.r}, "
                          f"target_modules={lora.target_modules}, dropout={lora.dropout}")
    for m, w in cfg.loss.heads.items():
        if not w >= 0:
            raise ConfigError(f"loss.heads.{m}", f"must be >= 0, got {w}")
    if cfg.model is not None:
        unknown = sorted(set(cfg.loss.heads) - set(cfg.model.heads))
        if unknown:
            raise ConfigError(f"loss.heads.{unknown[0]}", f"the model has no head for it (heads: {sorted(cfg.model.heads)})")
        if cfg.model.dtype != "float32" and cfg.deepspeed is None:
            raise ConfigError("model.dtype", "plain PyTorch training keeps float32 weights (bf16 runs under autocast); "
                              "low-precision weights with fp32 masters need a DeepSpeed config")
        if cfg.model.dtype == "float16":
            raise ConfigError("model.dtype", "float16 training is not supported: use bfloat16")
        check_encode_batch(cfg, [m for m, media in cfg.model.media.items() if not media.kind])
    if cfg.train.precision == "fp32" and cfg.model is not None and cfg.model.dtype != "float32":
        raise ConfigError("train.precision", f"fp32 needs model.dtype float32, got {cfg.model.dtype}")


def check_encode_batch(cfg: FinetuneConfig, tokenized: list[str]) -> None:
    """Raise ConfigError naming a `data.encode_batch` modality that no media tokenizer of the model (`tokenized`)
    encodes: its batch size would never be used."""
    if unknown := sorted(set(cfg.data.encode_batch) - set(tokenized)):
        raise ConfigError(f"data.encode_batch.{unknown[0]}", f"the model tokenizes no {unknown[0]} "
                          f"(it tokenizes: {', '.join(sorted(tokenized)) or 'nothing'})")


def check_ready(cfg: FinetuneConfig) -> None:
    """Everything the run will read exists and the DeepSpeed config fits: call before any work starts."""
    root = data_root(cfg)
    records = {"data.train": cfg.data.train, "data.validation": cfg.data.validation,
               "text_tokenizer.records": cfg.text_tokenizer.records if cfg.text_tokenizer else []}
    for key, paths in records.items():
        files = []
        for p in paths:
            try:
                files += record_files(root / p)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(key, str(e)) from e
        if files and len(empty_record_files(files)) == len(files):
            raise ConfigError(key, str(NoRecordsError(files)))
    directories = {"init_from": cfg.init_from}
    if cfg.model is not None:
        directories |= {"model.base": cfg.model.base, "model.tokenizer": cfg.model.tokenizer}
        directories |= {f"model.media.{m}.path": media.path for m, media in cfg.model.media.items()}
        if cfg.text_tokenizer is not None:
            directories.pop("model.tokenizer")  # trained first when missing
    for key, path in directories.items():
        if path is not None and not Path(path).is_dir():
            raise ConfigError(key, f"no such directory: {path}")
    if not cfg.train.resume and any((Path(cfg.output_dir) / "checkpoints").glob("step-*")):
        raise ConfigError("train.resume", f"{cfg.output_dir} holds checkpoints of an earlier run: "
                          "resume it, or choose another output_dir")
    if cfg.deepspeed is not None:
        deepspeed_config(cfg, world_size=1, hidden_size=1)
    if cfg.train.tensorboard:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError as e:
            raise ConfigError("train.tensorboard", "the tensorboard package is not installed: "
                              "pip install tensorboard, or set train.tensorboard=false") from e


def with_absolute_paths(cfg: FinetuneConfig) -> FinetuneConfig:
    """The recipe with its relative paths made absolute, so that a checkpoint's copy of it works from anywhere.
    (Paths inside a media tokenizer's `options` are the tokenizer's own: give them absolute.)"""

    def absolute(path: str | None) -> str | None:
        return None if path is None else str(Path(path).expanduser().absolute())

    data = replace(cfg.data, root=absolute(cfg.data.root), cache_dir=absolute(cfg.data.cache_dir))
    model = cfg.model
    if model is not None:
        media = {m: replace(spec, path=absolute(spec.path)) for m, spec in model.media.items()}
        model = replace(model, base=absolute(model.base), tokenizer=absolute(model.tokenizer), media=media)
    return replace(cfg, output_dir=absolute(cfg.output_dir), init_from=absolute(cfg.init_from),
                   deepspeed=absolute(cfg.deepspeed), data=data, model=model)


def data_root(cfg: FinetuneConfig) -> Path:
    return Path(cfg.data.root).expanduser() if cfg.data.root is not None else cache_dir() / "corpora"


# ---- DeepSpeed ----------------------------------------------------------------------------------


def deepspeed_config(cfg: FinetuneConfig, *, world_size: int, hidden_size: int) -> dict[str, Any]:
    """The recipe's DeepSpeed JSON with every "auto" filled in from the recipe (and the model's hidden size).

    Raises ConfigError for an unreadable file, a stage other than 1-3, fp16, a
    scheduler section (the recipe owns the schedule), a fixed value that
    disagrees with the recipe, or an "auto" this function cannot fill.
    """
    source = cfg.deepspeed
    try:
        ds = json.loads(Path(source).read_text())
    except OSError as e:
        raise ConfigError("deepspeed", f"cannot read {source}: {e.strerror}") from e
    except ValueError as e:
        raise ConfigError("deepspeed", f"{source} is not valid JSON: {e}") from e
    if not isinstance(ds, dict):
        raise ConfigError("deepspeed", f"{source} must hold a JSON object, got {_json_type(ds)}")
    for key in ("zero_optimization", "fp16", "bf16", "optimizer", "optimizer.params"):
        _json_object(ds, key, source)
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (1, 2, 3):
        raise ConfigError("zero_optimization.stage", f"must be 1, 2 or 3, got {stage!r}", source)
    if "scheduler" in ds:
        raise ConfigError("scheduler", "remove it: the recipe's `schedule` sets the learning rate", source)
    if ds.get("fp16", {}).get("enabled", False) not in (False, "auto"):
        raise ConfigError("fp16.enabled", "fp16 training is not supported: use bf16", source)
    if "fp16" in ds:
        ds["fp16"]["enabled"] = False
    if str(ds.get("optimizer", {}).get("type", "AdamW")).lower() not in ("adamw", "adam"):
        raise ConfigError("optimizer.type", "must be AdamW: the recipe's `optim` describes AdamW", source)

    o, t = cfg.optim, cfg.train
    # key -> (value, the recipe key it comes from); these are set when missing or "auto", and checked otherwise
    from_recipe = {
        "train_micro_batch_size_per_gpu": (cfg.data.batch_size, "data.batch_size"),
        "gradient_accumulation_steps": (t.grad_accum, "train.grad_accum"),
        "train_batch_size": (cfg.data.batch_size * t.grad_accum * world_size, "data.batch_size × train.grad_accum × ranks"),
        "gradient_clipping": (o.max_grad_norm, "optim.max_grad_norm"),
        "bf16.enabled": (resolve_precision(t.precision) == "bf16", "train.precision"),
    }
    if "optimizer" in ds:
        from_recipe |= {
            "optimizer.params.lr": (o.lr, "optim.lr"),
            "optimizer.params.betas": (list(o.betas), "optim.betas"),
            "optimizer.params.eps": (o.eps, "optim.eps"),
            "optimizer.params.weight_decay": (o.weight_decay, "optim.weight_decay"),
        }
    for key, (value, recipe_key) in from_recipe.items():
        *parents, leaf = key.split(".")
        node = ds
        for part in parents:
            node = node.setdefault(part, {})
        if node.setdefault(leaf, "auto") == "auto":
            node[leaf] = value
        elif node[leaf] != value:
            raise ConfigError(key, f"is {node[leaf]!r} but {recipe_key} makes it {value!r}: set it to \"auto\"", source)
    # HF's sizes for the communication buckets, from the model's hidden size; filled only where "auto"
    zero = ds["zero_optimization"]
    for key, value in {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }.items():
        if zero.get(key) == "auto":
            zero[key] = value
    left = _autos(ds)
    if left:
        raise ConfigError(left[0], "\"auto\" is not filled by mllm: give a value", source)
    return ds


def resolve_precision(precision: Precision) -> Literal["bf16", "fp32"]:
    if precision != "auto":
        return precision
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def _json_object(ds: dict, key: str, source: str) -> None:
    """Raise ConfigError unless the dotted `key` of `ds` is absent or a JSON object (its parents checked first)."""
    node = ds
    for part in key.split("."):
        if part not in node:
            return
        node = node[part]
    if not isinstance(node, dict):
        raise ConfigError(key, f"must be a JSON object, got {_json_type(node)}", source)


def _json_type(value: Any) -> str:
    """`value` as a message names it: null, a list, "AdamW", true, 2."""
    if value is None or isinstance(value, list):
        return "null" if value is None else "a list"
    return json.dumps(value) if isinstance(value, (bool, int, float, str)) else type(value).__name__


def _autos(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _positive(cfg: FinetuneConfig, *keys: str) -> None:
    for key in keys:
        if _get(cfg, key) <= 0:
            raise ConfigError(key, f"must be > 0, got {_get(cfg, key)}")
