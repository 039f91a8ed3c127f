"""Ranks and engines: the same training step on one CPU process, under torchrun, or under DeepSpeed ZeRO.

    env = DistEnv.from_environ()               # RANK / LOCAL_RANK / WORLD_SIZE, as torchrun and deepspeed set them
    device = init_distributed(env, use_deepspeed=cfg.deepspeed is not None)
    engine = build_engine(model, cfg, env, device, hidden_size)  # hidden_size: the LM's, for DeepSpeed's buckets
    out = engine.forward(batch)                # per micro-batch
    engine.backward(loss, boundary=last)       # accumulates; DeepSpeed reduces and partitions
    result = engine.finish_step()              # clip, update unless the gradient is non-finite

`TorchEngine` is plain PyTorch: AdamW, DDP when there are several ranks, bf16
by autocast over fp32 weights. `DeepSpeedEngine` hands the model to
`deepspeed.initialize` with the recipe's JSON config ("auto" filled in); its
fp32 master weights and optimizer state are partitioned across ranks. This is
the only module that imports deepspeed.

Both report a step as applied or skipped: a non-finite gradient skips the
update (the loop poisons the gradient of a non-finite loss, so that skips too).
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist
from torch import nn

from mllm.sequence import MultimodalBatch
from mllm.train.recipe import FinetuneConfig, deepspeed_config, resolve_precision


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environ(cls) -> "DistEnv":
        """The launcher's ranks (torchrun and deepspeed set these); a lone process is rank 0 of 1."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(env: DistEnv, *, use_deepspeed: bool) -> torch.device:
    """Join the process group (gloo on CPU, nccl on CUDA) and return this rank's device."""
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    if use_deepspeed:
        import deepspeed

        refuse_stale_build_locks()
        if "RANK" not in os.environ:  # a lone process: DeepSpeed still wants a process group of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        deepspeed.init_distributed()
        release_shared_memory_names(env)
    elif env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")


SHM_DIR = Path("/dev/shm")


def release_shared_memory_names(env: DistEnv, shm_dir: Path = SHM_DIR) -> None:
    """Unlink this rank's DeepSpeed all-reduce buffer name, so that no run leaves it in RAM after it ends.

    On CPU, when every rank is on one machine, DeepSpeed's shared-memory op gives each rank a 67 MB buffer
    `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>` in /dev/shm and never unlinks it: each
    two-rank run leaked 134 MB of RAM until the next reboot. `init_distributed` returns once every rank has
    mapped every other rank's buffer, so after a barrier the names are no longer needed; the mappings stay
    valid until the processes exit, however they exit.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if env.world_size > 1:
        barrier()
    (shm_dir / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{env.rank}").unlink(missing_ok=True)


STALE_LOCK_S = 30 * 60  # DeepSpeed's JIT builds take 0.5-3 min on two cores


def refuse_stale_build_locks(root: Path | None = None) -> None:
    """Fail fast, naming the file, where a killed JIT build left its `lock` behind.

    torch's extension loader waits, silently and for ever, while `<op>/lock` exists; DeepSpeed loads its
    shared-memory op (CPU) or Adam op at start-up, so every rank of every later launch would sleep.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = root or Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    # <root>/<op>/lock under $TORCH_EXTENSIONS_DIR, <root>/py311_cpu/<op>/lock under the default root
    for lock in (p for pattern in ("*/lock", "*/*/lock") for p in root.glob(pattern)):
        age = time.time() - lock.stat().st_mtime
        if age > STALE_LOCK_S:
            raise RuntimeError(f"{lock} is {age / 60:.0f} min old: a JIT build of a DeepSpeed op was killed half-way, "
                               "and every launch would wait on it for ever. Delete it if no build is running.")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


@contextlib.contextmanager
def on_sigterm(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Within the block, SIGTERM calls `handler` instead of ending the process; the previous handler is back
    after it. Off the main thread, where Python takes no signal handlers, the block runs with SIGTERM as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def main_first(env: DistEnv) -> Iterator[None]:
    """Rank 0 runs the block first (it fills caches), then the other ranks (they read them)."""
    if not env.is_main:
        barrier()
    yield
    if env.is_main:
        barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class StepResult:
    applied: bool  # False: the gradient was non-finite and no weight changed
    grad_norm: float | None  # before clipping


class Engine(abc.ABC):
    """One optimizer step = `forward` + `backward` per micro-batch, then `finish_step`."""

    module: nn.Module  # the policy-wrapped model, not the DDP/DeepSpeed wrapper
    optimizer: torch.optim.Optimizer
    device: torch.device
    feature_dtype: torch.dtype  # continuous features are cast to this
    shards_optimizer_state: bool  # True: every rank saves its own part; False: rank 0's copy serves all

    @abc.abstractmethod
    def forward(self, batch: MultimodalBatch):
        """The model's output on one micro-batch (already on `device`)."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        """Accumulate the gradient of one micro-batch's loss divided by the step's micro-batches (÷ grad_accum
        here; DDP and ZeRO average over ranks); `boundary` on the step's last one. The loop scales each loss by
        its micro-batch's share of the step's tokens, so the step's gradient is the mean over its tokens."""

    @abc.abstractmethod
    def finish_step(self) -> StepResult:
        """Clip and update, or skip the update when the gradient is non-finite; gradients are cleared."""

    @abc.abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter in full and in fp32, by name, on rank 0 (a collective: every rank calls it)."""

    @abc.abstractmethod
    def optimizer_state(self) -> dict:
        """This rank's optimizer state: nested dicts and lists of tensors and plain values."""

    @abc.abstractmethod
    def load_optimizer_state(self, state: dict) -> None:
        """Restore what `optimizer_state` returned (from the same number of ranks, when sharded)."""

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class TorchEngine(Engine):
    shards_optimizer_state = False

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, env: DistEnv, device: torch.device):
        self.module, self.device = model.to(device), device
        self.bf16 = resolve_precision(cfg.train.precision) == "bf16"
        self.feature_dtype = torch.float32
        self.max_grad_norm = cfg.optim.max_grad_norm or math.inf
        # Heads and projectors see no gradient in batches without their media: DDP must not wait for them.
        self.ddp = None
        if env.world_size > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                           fused=device.type == "cuda")
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.accum = cfg.train.grad_accum  # micro-batches per step on this rank

    def forward(self, batch: MultimodalBatch):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return (self.ddp or self.module)(**batch.model_inputs())

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        sync = boundary or self.ddp is None
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            (loss / self.accum).backward()

    def finish_step(self) -> StepResult:
        for p in self.params:  # not reached this step (a head without targets): a zero gradient, as DeepSpeed has
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norm = float(nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(applied, norm)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu() for n, p in self.module.named_parameters() if p.requires_grad}

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


class DeepSpeedEngine(Engine):
    shards_optimizer_state = True

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, env: DistEnv, device: torch.device, hidden_size: int):
        import deepspeed

        self.env = env
        ds_config = deepspeed_config(cfg, world_size=env.world_size, hidden_size=hidden_size)
        groups = param_groups(model, cfg.optim.weight_decay)
        o = cfg.optim
        # With no "optimizer" section DeepSpeed wraps ours; with one it builds its own (CPUAdam for offload).
        client = None if "optimizer" in ds_config else torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=client, config=ds_config
        )
        self.module, self.device = model, device
        self.feature_dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32

    def forward(self, batch: MultimodalBatch):
        return self.engine(**batch.model_inputs())

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        self.engine.backward(loss)  # scaled by 1 / gradient_accumulation_steps
        if not boundary:
            self.engine.step()  # only counts the micro-step

    def finish_step(self) -> StepResult:
        self.engine.step()  # reduces, clips, updates, unless the gradient overflowed
        norm = self.engine.get_global_grad_norm()
        return StepResult(self.engine.was_step_applied(), None if norm is None else float(norm))

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)  # the fp32 master, gathered from its partitions
                if self.env.is_main:
                    state[name] = full.detach().cpu()
        return state

    def optimizer_state(self) -> dict:
        from deepspeed.checkpoint.constants import LOSS_SCALER, PARAM_SLICE_MAPPINGS

        state = self.optimizer.state_dict()
        state.pop(LOSS_SCALER)  # an object, static (scale 1) in bf16 and fp32: the running one is kept on load
        state.pop(PARAM_SLICE_MAPPINGS, None)  # bookkeeping for DeepSpeed's universal checkpoints; not read back
        return state

    def load_optimizer_state(self, state: dict) -> None:
        from deepspeed.checkpoint.constants import LOSS_SCALER

        state[LOSS_SCALER] = self.optimizer.loss_scaler
        # ZeRO takes one state per rank and reads its own; fp32 masters come from the saved partitions.
        per_rank = [state if r == self.env.rank else None for r in range(self.env.world_size)]
        self.optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)


def build_engine(model: nn.Module, cfg: FinetuneConfig, env: DistEnv, device: torch.device, hidden_size: int) -> Engine:
    if cfg.deepspeed is None:
        return TorchEngine(model, cfg, env, device)
    return DeepSpeedEngine(model, cfg, env, device, hidden_size)
