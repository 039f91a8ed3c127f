"""The finetuning loop: one path from a laptop CPU process to DeepSpeed ZeRO-3 across GPU nodes.

    mllm finetune finetune/recipes/mm_pretrain.yaml train.max_steps=200
    torchrun --nproc_per_node 2 -m mllm.cli finetune RECIPE.yaml
    deepspeed --no_local_rank --num_gpus 8 --module mllm.cli finetune RECIPE.yaml deepspeed=finetune/deepspeed/zero3.json

A step reads `train.grad_accum` micro-batches on every rank. The micro-batches
come from one stream per epoch that every rank builds alike: the records
shuffled by (seed, epoch), encoded and packed. Step k takes the next
grad_accum × ranks of them and rank r the r-th of every `ranks`, so the
batches of a step, and hence its loss, do not depend on how many ranks share
it. Each loss term is a mean over the whole step's tokens (head target slots,
transcribed items) on every rank, not a mean of micro-batch means (`step`), so
neither does it depend on the batch size, accumulation or packing. The data
position is (epoch, index of the next micro-batch) in that stream: resuming with a recipe
that makes another stream (STREAM_KEYS) warns.

A micro-batch whose loss is not finite gets a NaN gradient, and the engine
skips an update whose gradient is not finite; `train.max_bad_steps` such
steps in a row stop the run with an error naming the step and its batches.

SIGTERM (a scheduler's preemption, `kill`) finishes the step under way: every
rank learns of it through the step's all-reduce, so all stop after the same
step, save it, and exit with status 143; the same command resumes from there.

Rank 0 prints the trainable-parameter count, shows a progress bar, appends
each step to `metrics.jsonl`, writes TensorBoard scalars to `tensorboard/`,
and at the end draws `loss.png` and exports `final/`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from functools import reduce
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mllm.config import ConfigError, to_dict
from mllm.data.cache import TokenCache
from mllm.data.input_augment import InputAugment
from mllm.data.loader import MultimodalLoader
from mllm.data.records import BadRecords, iter_records, read_records, record_files
from mllm.files import atomic_write
from mllm.plots import save_loss_curves
from mllm.sequence import IGNORE_INDEX, MultimodalBatch
from mllm.tokenizers.text import train_text_tokenizer
from mllm.train.checkpointing import (
    TrainerState,
    build_from_recipe,
    complete_checkpoints,
    export_checkpoint,
    load_optimizer,
    load_rng,
    load_trainable,
    read_trainer_state,
    save_step,
)
from mllm.train.distributed import (
    DistEnv, all_reduce_sum, barrier, build_engine, init_distributed, main_first, on_sigterm, shutdown,
)
from mllm.train.policy import apply_policy, trainable_summary
from mllm.train.recipe import FinetuneConfig, check_encode_batch, check_ready, data_root, load_recipe, with_absolute_paths
from mllm.train.recipe_data import recipe_records, recipe_token_cache

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


def finetune(cfg: FinetuneConfig) -> Path | None:
    """Train `cfg` to train.max_steps, resuming from the latest checkpoint in output_dir.
    Returns the exported `<output_dir>/final` on rank 0 (None elsewhere, or with train.export "none")."""
    cfg = with_absolute_paths(cfg)
    check_ready(cfg)
    run = Finetune(cfg, DistEnv.from_environ())
    try:
        run.train()
    finally:
        run.close()
    return run.export()


def cosine_lr(step: int, cfg: FinetuneConfig) -> float:
    """The learning rate of step `step` (0-based): linear warm-up, then cosine to min_lr_ratio · lr."""
    lr, warmup, total = cfg.optim.lr, cfg.schedule.warmup_steps, cfg.train.max_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    floor = cfg.schedule.min_lr_ratio
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# the recipe keys that make an epoch's micro-batch stream, which the data position (epoch, micro-batch) indexes
STREAM_KEYS = ("train.seed", "data.train", "data.tasks", "data.repeat", "data.repeat_default", "data.max_length",
               "data.batch_size", "data.packing", "data.augment")


def stream_changes(saved: FinetuneConfig, cfg: FinetuneConfig) -> list[str]:
    """`key old -> new` for each of STREAM_KEYS whose value in `cfg` is not the one in `saved` (a checkpoint's recipe)."""
    changed = []
    for key in STREAM_KEYS:
        old, new = (to_dict(reduce(getattr, key.split("."), c)) for c in (saved, cfg))
        if old != new:
            changed.append(f"{key} {old} -> {new}")
    return changed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant, so frozen inputs work).
    transformers 5 renamed gradient to activation checkpointing; the old name warns, and goes in 6."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Finetune:
    """One run of a recipe: set up (model, policy, engine, data, resume), train, save, export."""

    def __init__(self, cfg: FinetuneConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.output_dir)
        self.device = init_distributed(env, use_deepspeed=cfg.deepspeed is not None)
        if cfg.text_tokenizer is not None:
            self._train_text_tokenizer()
        with main_first(env):  # rank 0 builds the record tables, the others read them; before the model, so that a
            self.train_records, self.validation_records = recipe_records(cfg)  # data error comes first

        model, self.processor = build_from_recipe(cfg)
        if cfg.train.gradient_checkpointing:
            enable_checkpointing(model)
        self.heads = sorted(model.config.heads)
        self.head_weights = {m: model.config.heads[m]["loss_weight"] for m in self.heads}  # λ_m in the model's loss
        self.continuous = sorted(model.projectors)  # the modalities whose items may carry transcripts
        self.attn_implementation = model.config._attn_implementation
        hidden_size = model.config.text_config.hidden_size
        trained = apply_policy(model, cfg.policy)
        self.say(trainable_summary(trained))

        checkpoints = complete_checkpoints(self.out) if cfg.train.resume else []
        resume = checkpoints[-1] if checkpoints else None
        if resume is not None:
            load_trainable(trained, resume)  # before the engine partitions the weights
        model.touch_idle_modules = env.world_size > 1  # ranks stay in lockstep whatever media they hold
        self.engine = build_engine(trained, cfg, env, self.device, hidden_size)
        seed_everything(cfg.train.seed + env.rank)
        self.state = TrainerState(world_size=env.world_size)
        if resume is not None:
            self.state = read_trainer_state(resume)
            if self.state.step > cfg.train.max_steps:  # no step would run, and the export would be of that checkpoint
                raise ConfigError("train.max_steps", f"{cfg.train.max_steps}, but {resume} is past it (step "
                                  f"{self.state.step}); raise it, or set train.resume: false or another output_dir")
            load_optimizer(self.engine, env, resume, self.state)
            load_rng(resume, env)
            self.state.world_size = env.world_size
            self.say(f"resumed from {resume} (step {self.state.step}, epoch {self.state.epoch}, batch {self.state.batch})")
            if env.is_main and (changed := stream_changes(load_recipe(resume / "recipe.yaml"), cfg)):
                logger.warning("the recipe's data stream differs from the one %s was trained on (%s): its data position "
                               "counts micro-batches of the old stream, so this epoch's records are not each visited "
                               "once, nor as they would have been", resume, "; ".join(changed))

        self.cache = self._encode_media()
        if cfg.train.eval_every and self.validation_records is not None:
            self._check_validation()
        self.stopping = False  # set by SIGTERM during train(): every rank stops after the step under way
        self.last_pass = BadRecords()  # the bad records of the latest data pass
        self.repeat_rates = self._repeat_rates()
        self.writer = None
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._trim_metrics()
            if cfg.train.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run's first step is state.step + 1: the scalars an interrupted run logged from there go
                self.writer = SummaryWriter(self.out / "tensorboard", purge_step=self.state.step + 1)

    def say(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)

    # ---- data -----------------------------------------------------------------------------------

    def _train_text_tokenizer(self) -> None:
        out, spec = Path(self.cfg.model.tokenizer), self.cfg.text_tokenizer
        with main_first(self.env):
            if self.env.is_main and not out.is_dir():
                files = [f for p in spec.records for f in record_files(data_root(self.cfg) / p)]
                texts, bad = [], BadRecords("skip")
                for record in iter_records(read_records(files, streaming=True), bad):
                    for m in record.messages:
                        parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
                        texts += [part["text"] for part in parts if part["type"] == "text"]
                    if len(texts) >= spec.max_texts:
                        break
                if not any(t.strip() for t in texts):
                    raise ConfigError("text_tokenizer.records", f"no text to learn a vocabulary from in {', '.join(files)} "
                                      f"({bad.summary()})")
                tmp = out.with_name(f".{out.name}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    train_text_tokenizer(texts[: spec.max_texts], tmp, vocab_size=spec.vocab_size)
                except RuntimeError as e:  # SentencePiece: e.g. more pieces asked for than the texts hold
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise ConfigError("text_tokenizer", f"no {spec.vocab_size}-token vocabulary from "
                                      f"{min(len(texts), spec.max_texts)} texts: {e}") from e
                os.replace(tmp, out)
                self.say(f"trained a {spec.vocab_size}-token text tokenizer on {len(texts)} texts: {out}")

    def _encode_media(self) -> TokenCache | None:
        """The token cache, every medium of the records in it (each rank encodes its share); None without media."""
        tokenizers = self.processor.media_tokenizers
        check_encode_batch(self.cfg, list(tokenizers))  # an init_from model's media are known once it is loaded
        cache = recipe_token_cache(self.cfg, tokenizers) if tokenizers else None
        if cache is not None:
            for ds in (self.train_records, self.validation_records):
                if ds is not None:
                    cache.encode_records(ds.shard(self.env.world_size, self.env.rank, contiguous=True), progress=self.env.is_main)
            barrier()
            cache.reload()
        return cache

    def _check_validation(self) -> None:
        """Raise ConfigError naming data.validation unless its records make a micro-batch for every rank."""
        world = self.env.world_size
        seen = sum(1 for _ in islice(self.micro_batches(self.validation_records, seed=0, train=False), world))
        if seen < world:  # the pass ran to its end: last_pass counts its records
            raise ConfigError("data.validation", f"its {len(self.validation_records)} records (after data.tasks) make "
                              f"{seen} micro-batches, fewer than the {world} ranks that each evaluate one "
                              f"(data pass: {self.last_pass.summary()})")

    def _repeat_rates(self) -> np.ndarray | None:
        """[R] each train record's `data.repeat` rate (`data.repeat_default` for a task not named); None when
        every rate is 1."""
        repeat, default = self.cfg.data.repeat, self.cfg.data.repeat_default
        if not repeat and default == 1:
            return None
        return np.array([repeat.get(t, default) for t in self.train_records["task"]])

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """The train record indices epoch `epoch` visits, shuffled: each record once, or at its task's
        `data.repeat` rate r: floor(r) times, plus once more with probability r - floor(r), drawn afresh each
        epoch from (seed, epoch), so a rate below 1 thins a task and a resumed run draws the same rows."""
        rng = np.random.default_rng([self.cfg.train.seed, epoch])
        rows = np.arange(len(self.train_records))
        if (rate := self.repeat_rates) is not None:
            rows = np.repeat(rows, np.floor(rate).astype(int) + (rng.random(len(rows)) < rate % 1))
        return rng.permutation(rows)

    def micro_batches(self, records, seed: int, train: bool = True) -> Iterator[Callable[[], MultimodalBatch]]:
        """One pass over `records` as micro-batches that collate when called. Every rank walks the whole
        stream but builds (attention masks and all) only the batches it trains on. A train pass perturbs
        the user turns' media (`data.augment`) from `seed`, so a resumed pass replays its draws."""
        d = self.cfg.data
        augment = InputAugment(d.augment, self.processor, seed) if train and d.augment.enabled else None
        loader = MultimodalLoader(records, self.processor, max_length=d.max_length, batch_size=d.batch_size,
                                  packing=d.packing, cache=self.cache, augment=augment, policy=d.bad_records,
                                  attn_implementation=self.attn_implementation, dtype=self.engine.feature_dtype,
                                  seed=seed, transcripts=train and self.cfg.loss.transcripts > 0)
        yield from loader.lazy_batches()
        self.last_pass = loader.bad
        if self.env.is_main:
            (logger.warning if loader.bad.skipped else logger.info)("data pass done: %s", loader.bad.summary())

    def steps(self) -> Iterator[tuple[int, int, list[MultimodalBatch]]]:
        """(epoch, index of the first micro-batch, this rank's micro-batches) per step, from the saved position on."""
        world, rank = self.env.world_size, self.env.rank
        per_step = self.cfg.train.grad_accum * world
        epoch, start = self.state.epoch, self.state.batch
        while True:
            order = self.epoch_rows(epoch)
            mine, seen = [], 0
            for index, batch in enumerate(self.micro_batches(self.train_records.select(order), seed=self.cfg.train.seed + epoch)):
                seen = index + 1
                if index < start:
                    continue
                offset = (index - start) % per_step
                if offset % world == rank:
                    mine.append(batch())
                if offset == per_step - 1:
                    yield epoch, index + 1 - per_step, mine
                    mine = []
            if start == 0 and seen < per_step:
                raise ValueError(f"the training data make {seen} micro-batches per epoch, fewer than one step "
                                 f"takes ({per_step}: train.grad_accum {self.cfg.train.grad_accum} × {world} ranks); "
                                 f"data pass: {self.last_pass.summary()}")
            epoch, start = epoch + 1, 0

    # ---- training -------------------------------------------------------------------------------

    def train(self) -> None:
        with on_sigterm(self._stop_after_this_step):
            self._train()

    def _stop_after_this_step(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _train(self) -> None:
        t = self.cfg.train
        per_step = t.grad_accum * self.env.world_size
        bar = tqdm(total=t.max_steps, initial=self.state.step, desc="finetune", unit="step", disable=not self.env.is_main)
        steps = self.steps()
        bad_in_a_row = 0
        while self.state.step < t.max_steps:
            epoch, first, batches = next(steps)
            started = time.perf_counter()
            log = self.step(batches)
            stop = log.pop("stop")
            self.state.step += 1
            self.state.epoch, self.state.batch = epoch, first + per_step
            step = self.state.step
            log |= {"step": step, "epoch": epoch, "batch": first, "seconds": time.perf_counter() - started}
            log["tokens_per_s"] = log.pop("tokens") / log["seconds"]
            if t.eval_every and step % t.eval_every == 0:
                log |= self.evaluate()
            self._log(log)
            bad_in_a_row = bad_in_a_row + 1 if log["skipped"] else 0
            if log["skipped"]:
                self._report_bad_step(log, bad_in_a_row, first + per_step - 1)
            bar.update()
            bar.set_postfix(loss=f"{log['loss']:.4f}", lr=f"{log['lr']:.2e}")
            if (t.save_every and step % t.save_every == 0) or step == t.max_steps or stop:
                save_step(self.engine, self.env, self.cfg, self.state)
            if stop:
                bar.close()
                self.say(f"stopped by SIGTERM after step {step}, which is saved: the same command resumes from it")
                raise SystemExit(128 + signal.SIGTERM)
        bar.close()
        if self.env.is_main:
            self._plot()

    def _report_bad_step(self, log: dict, in_a_row: int, last: int) -> None:
        """Warn about a skipped step; raise when it is the max_bad_steps-th in a row."""
        where = f"step {log['step']} (epoch {log['epoch']}, micro-batches {log['batch']}-{last})"
        bad = [str(log["batch"] + i) for i in log["bad_batches"]]
        cause = f"non-finite loss in micro-batch {', '.join(bad)}" if bad else "non-finite gradient"
        logger.warning("%s skipped: %s", where, cause)
        if in_a_row >= self.cfg.train.max_bad_steps:
            raise NonFiniteLossError(f"{in_a_row} steps in a row had a non-finite loss or gradient; the last was {where}: {cause}")

    def _units(self, batch: MultimodalBatch) -> list[int]:
        """What each loss term of `batch` is a mean over: [labelled (shifted) tokens, each head's target slots,
        each continuous modality's transcribed items] (heads and modalities in sorted order)."""
        labelled = 0 if batch.labels is None else int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        slots = [int(batch.feature_targets[m].sum()) if m in batch.feature_targets else 0 for m in self.heads]
        said = [sum(t.numel() > 0 for t in batch.transcripts.get(m, [])) for m in self.continuous]
        return [labelled, *slots, *said]

    def step(self, batches: list[MultimodalBatch]) -> dict:
        """One optimizer step over this rank's micro-batches; the returned numbers are over all ranks.

        The model's terms are means over their own micro-batch: CE over its labelled tokens, head m over its
        target slots, CTC over its transcribed items (each already per label). The engines average the step's
        micro-batches (÷ grad_accum, then the mean over ranks), so each term is scaled by its units' share of
        the step's × the step's micro-batches: the gradient is then the mean over every token (slot, item) of the
        step, whatever the batch size, accumulation, ranks or packing. With one micro-batch every scale is 1.
        """
        e, world, rank = self.engine, self.env.world_size, self.env.rank
        lr = cosine_lr(self.state.step, self.cfg)
        e.set_lr(lr)
        heads = len(self.heads)
        units = torch.tensor([self._units(b) for b in batches], dtype=torch.float64)  # [J, 1 + heads + continuous]
        step_units = all_reduce_sum(units.sum(0).to(e.device)).cpu()  # [1 + heads + continuous], every rank's
        said = step_units[1 + heads:]
        self.state.transcribed = sorted(set(self.state.transcribed) | {m for m, n in zip(self.continuous, said.tolist()) if n})
        # per term (CE, heads, CTC with every modality's items together): [J, 2 + heads] and [2 + heads]
        units = torch.cat([units[:, : 1 + heads], units[:, 1 + heads:].sum(1, keepdim=True)], 1)
        step_units = torch.cat([step_units[: 1 + heads], said.sum(0, keepdim=True)])
        shares = (units * (len(batches) * world) / step_units.clamp(min=1)).tolist()

        names = ["loss", "lm_loss", *(f"{m}_loss" for m in self.heads), "transcript_loss"]
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)  # Σ value × units per name (1 for loss), then tokens
        bad = torch.zeros(len(batches) * world, dtype=torch.float64)  # the step's micro-batches with a non-finite loss
        for j, batch in enumerate(batches):
            out = e.forward(batch.to(e.device, dtype=e.feature_dtype))
            lm_share, *head_shares, said_share = shares[j]
            loss = out.loss  # CE + Σ_m λ_m · head_m
            parts = {"lm_loss": getattr(out, "lm_loss", None), "transcript_loss": getattr(out, "transcript_loss", None)}
            parts |= {f"{m}_loss": v for m, v in (getattr(out, "head_losses", None) or {}).items()}
            if parts["lm_loss"] is not None and (c := self.cfg.loss.lm * lm_share - 1.0):
                loss = loss + c * parts["lm_loss"]
            for m, share in zip(self.heads, head_shares):
                if parts.get(f"{m}_loss") is not None and (c := self.head_weights[m] * (share - 1.0)):
                    loss = loss + c * parts[f"{m}_loss"]
            if parts["transcript_loss"] is not None:  # only on batches with transcribed media
                loss = loss + self.cfg.loss.transcripts * said_share * parts["transcript_loss"]
            if not torch.isfinite(loss):
                bad[j * world + rank] = 1
                loss = loss * math.nan  # a NaN gradient makes every rank skip this update
            e.backward(loss, boundary=j == len(batches) - 1)
            parts["loss"] = loss
            for i, (name, n) in enumerate(zip(names, [1.0, *units[j].tolist()])):
                if parts.get(name) is not None:
                    sums[i] += parts[name].item() * n
            sums[-1] += batch.input_ids.numel()
        result = e.finish_step()
        stop = torch.tensor([float(self.stopping)], dtype=torch.float64)  # any rank's SIGTERM stops them all here
        totals = all_reduce_sum(torch.cat([sums, bad, stop]).to(e.device)).cpu()
        # the token-weighted means; `loss` is the step's objective: Σ scaled losses / micro-batches
        counts = [len(batches) * world, *step_units.tolist()]
        log = {name: totals[i].item() / n for i, (name, n) in enumerate(zip(names, counts)) if n > 0}
        return log | {"lr": lr, "grad_norm": result.grad_norm, "skipped": not result.applied,
                      "tokens": totals[len(sums) - 1].item(),
                      "bad_batches": [i for i, b in enumerate(totals[len(sums):-1].tolist()) if b],
                      "stop": totals[-1].item() > 0}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The loss over the first train.eval_batches validation micro-batches (whole rounds of ranks), weighted as a
        step's: `eval_lm_loss` over every labelled token, `eval_<modality>_loss` over every target slot, and
        `eval_loss` = CE + Σ λ_m · head_m of those (no `loss.lm` weight, no CTC: comparable across recipes). All NaN,
        with a warning, when no micro-batch ran."""
        e, world, rank = self.engine, self.env.world_size, self.env.rank
        limit = max(self.cfg.train.eval_batches // world, 1) * world
        mine, seen = [], 0
        for index, batch in enumerate(self.micro_batches(self.validation_records, seed=0, train=False)):
            if index == limit:
                break
            seen = index + 1
            if index % world == rank:
                mine.append(batch())
        mine = mine[: seen // world]  # every rank runs as many forwards (ZeRO-3 gathers weights collectively)
        names = ["lm_loss", *(f"{m}_loss" for m in self.heads)]
        totals = torch.zeros(2 * len(names) + 1, dtype=torch.float64)  # Σ term × units, Σ units, micro-batches
        e.train(False)
        for batch in mine:
            out = e.forward(batch.to(e.device, dtype=e.feature_dtype))
            parts = {"lm_loss": getattr(out, "lm_loss", None)}
            parts |= {f"{m}_loss": v for m, v in (getattr(out, "head_losses", None) or {}).items()}
            for i, (name, n) in enumerate(zip(names, self._units(batch))):
                if parts.get(name) is not None and n:
                    totals[i] += parts[name].item() * n
                    totals[len(names) + i] += n
            totals[-1] += 1
        e.train(True)
        totals = all_reduce_sum(totals.to(e.device)).cpu()
        if totals[-1] == 0:
            logger.warning("no validation micro-batch ran on any rank: eval_loss is NaN (data.validation %s)",
                           self.cfg.data.validation)
            return {"eval_loss": math.nan} | {f"eval_{name}": math.nan for name in names}
        means = {f"eval_{name}": (totals[i] / totals[len(names) + i]).item()
                 for i, name in enumerate(names) if totals[len(names) + i] > 0}
        weights = [1.0, *(self.head_weights[m] for m in self.heads)]
        means["eval_loss"] = sum(w * means.get(f"eval_{name}", 0.0) for w, name in zip(weights, names))
        return means

    def _log(self, log: dict) -> None:
        if not self.env.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(log) + "\n")
        if self.writer is not None:
            for key, value in log.items():
                if key not in ("step", "epoch", "batch", "bad_batches") and value is not None:
                    self.writer.add_scalar(f"{'eval' if key.startswith('eval') else 'train'}/{key}", float(value), log["step"])

    def _plot(self) -> None:
        history = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]
        series = {"loss": [r["loss"] for r in history]}
        for name in ("lm_loss", "transcript_loss"):
            if any(name in r for r in history):
                series[name] = [r.get(name, math.nan) for r in history]
        evaluated = {"eval_loss": {r["step"]: r["eval_loss"] for r in history if "eval_loss" in r}}
        save_loss_curves(series, self.out / "loss.png", title=f"finetune: {self.out.name}",
                         points={k: v for k, v in evaluated.items() if v})

    def _trim_metrics(self) -> None:
        """Keep the metrics of the steps the resumed checkpoint includes; drop those it does not, and any line
        that does not parse (a process killed mid-append). The file is replaced atomically."""
        path = self.out / "metrics.jsonl"
        kept = []
        for n, line in enumerate(path.read_text().splitlines() if path.is_file() else [], 1):
            try:
                keep = json.loads(line)["step"] <= self.state.step
            except (ValueError, TypeError, KeyError) as e:
                logger.warning("%s:%d: dropped a metrics line that does not parse (%s)", path, n, e)
                continue
            if keep:
                kept.append(line + "\n")
        atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))

    # ---- the end --------------------------------------------------------------------------------

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        del self.engine
        shutdown()

    def export(self) -> Path | None:
        what = self.cfg.train.export
        if not self.env.is_main or what == "none":
            return None
        final = export_checkpoint(complete_checkpoints(self.out)[-1], self.out / "final", what=what)
        self.say(f"exported {'the language model' if what == 'language_model' else 'the merged model'} to {final}")
        return final
