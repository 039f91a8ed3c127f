"""Run tasks through a predictor, batched and resumable, and write the results.

    tasks = resolve_tasks(["pope_proxy", "eval/tasks/mme.yaml", "mine.jsonl"], corpora=..., policy="fail")
    results = run_eval(tasks, predictor, "runs/eval", model="runs/x/checkpoint", batch_size=8)

Writes into the output directory:

    results.json        task -> metrics ({"accuracy": 0.93, "n": 200, "proxy": true, "categories": {...}})
    predictions.jsonl   one line per item: task, id, prediction, answer, score (and files, for generation)
    media/<task>/       generated files
    cache/<task>.jsonl  each finished item, appended and flushed batch by batch: a killed run resumes
                        where it stopped, and recomputes nothing it finished
    run.json            the model and tasks the cache belongs to; a rerun with others is refused

A bad item (malformed line, missing or corrupt media, too long a prompt)
stops the run under policy "fail", or is skipped, logged and counted under "skip".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from mllm.data.records import BadRecordError, BadRecords
from mllm.errors import InputError
from mllm.eval.predictor import Predictor
from mllm.eval.proxies import PROXIES, build_proxy
from mllm.eval.tasks import Item, Modality, Prediction, Scores, Task, TaskSpec, build_task, list_tasks, load_task_spec, shipped_specs
from mllm.files import atomic_write
from mllm.media import MediaError, save_audio, save_image, save_video
from mllm.processor import MessageError, SequenceTooLongError
from mllm.registry import UnknownNameError

logger = logging.getLogger(__name__)
Policy = Literal["fail", "skip"]
MEDIA_SUFFIX = {"image": ".png", "audio": ".wav", "video": ".mp4"}
SAVERS = {"image": save_image, "audio": save_audio, "video": save_video}


class UnknownTaskError(UnknownNameError):
    """A task that is neither a shipped name nor a task file."""


class RunMismatchError(InputError, ValueError):
    """The output directory holds the cache of another model or other task settings."""


class TaskListError(InputError, ValueError):
    """The tasks asked for make no run: one listed twice, two of one name, or none left to run."""


class OutputFolderError(InputError):
    """The output folder cannot be made: a file is in the way."""


# ---- which tasks ---------------------------------------------------------------------------------------------


def resolve_tasks(
    names: Sequence[str],
    *,
    corpora: str | os.PathLike,
    policy: Policy = "fail",
    generate: Modality | None = None,
    proxy_root: str | os.PathLike | None = None,
) -> list[Task]:
    """Task names (shipped specs in eval/tasks, built-in proxies), spec YAML files or JSONL files -> tasks.
    `generate` makes JSONL files generation tasks. An unknown name fails, or is skipped under "skip"."""
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise TaskListError(f"task {repeated[0]!r} is listed twice: list each task once")
    tasks = []
    for name in names:
        path = Path(name)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            spec = load_task_spec(path)
        elif path.suffix == ".jsonl" and path.is_file():
            spec = TaskSpec("jsonl", str(path.resolve()), name=path.stem, options={"generate": generate} if generate else {})
        elif name in shipped_specs():
            spec = load_task_spec(shipped_specs()[name])
        elif name in PROXIES:
            spec = build_proxy(name, corpora, proxy_root)
        else:
            error = UnknownTaskError(f"unknown task {name!r}: not a .yaml/.jsonl file, nor one of {', '.join(list_tasks())}")
            if policy == "fail":
                raise error
            logger.warning("skipped %s", error)
            continue
        tasks.append(build_task(spec, policy))
    names_seen = [t.name for t in tasks]
    duplicates = sorted({n for n in names_seen if names_seen.count(n) > 1})
    if duplicates:
        sources = [t.source for t in tasks if t.name == duplicates[0]]
        raise TaskListError(f"two tasks are named {duplicates[0]!r} ({' and '.join(sources)}): give one a 'name' in its spec")
    return tasks


# ---- the per-item cache ----------------------------------------------------------------------------------


def _safe(name: str) -> str:
    """A file name for a task or item id; ids it had to change get a hash, so two never collide."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:100]
    return safe if safe == name else f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


class ItemCache:
    """Finished predictions of one task: a JSONL file appended a batch at a time and fsynced, so a
    kill loses at most the batch in flight (a torn last line is ignored)."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, Prediction] = {}
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        self.torn = bool(text) and not text.endswith("\n")
        for line in text.splitlines():
            try:
                prediction = Prediction.from_dict(json.loads(line))
            except (ValueError, TypeError, KeyError):
                continue  # the line a kill cut short
            self.done[prediction.id] = prediction

    def add(self, predictions: Sequence[Prediction]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            if self.torn:
                f.write(b"\n")  # end the torn line, so this batch starts on its own
                self.torn = False
            f.write("".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in predictions).encode())
            f.flush()
            os.fsync(f.fileno())
        for p in predictions:
            self.done[p.id] = p


def _check_run(out: Path, model: str, tasks: Sequence[Task]) -> None:
    """Refuse to mix caches: run.json records the model and each task's settings."""
    state = {"model": model, "tasks": {t.name: {"source": t.source, "mode": t.mode, "max_new_tokens": t.max_new_tokens,
                                                "items": _fingerprint(t.items)} for t in tasks}}
    path = out / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old["model"] != model:
            raise RunMismatchError(f"{out} holds results of model {old['model']}, not {model}: use another --out, or --overwrite")
        for name, settings in state["tasks"].items():
            if name in old["tasks"] and old["tasks"][name] != settings:
                raise RunMismatchError(f"{out}: task {name} ran before with {old['tasks'][name]}, now {settings}: "
                                       "use another --out, or --overwrite")
        state["tasks"] = old["tasks"] | state["tasks"]
    _write_json(path, state)


def _fingerprint(items: Sequence[Item]) -> str:
    """Changes when any item's id, question, answer, options or media change."""
    h = hashlib.sha256()
    for i in items:
        h.update(json.dumps([i.id, i.question, i.answer, i.choices, [m.path for m in i.media]], default=str).encode())
    return h.hexdigest()[:16]


def _batch_seed(task: Task, batch: Sequence[Item]) -> int:
    """The seed of a batch's random draws (sampled media, their de-tokenizers' noise), from its task and item ids:
    the same items give the same media whichever tasks ran before them, and however a run was resumed."""
    return int.from_bytes(hashlib.sha256("\n".join([task.name, *(i.id for i in batch)]).encode()).digest()[:8], "little")


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, ensure_ascii=False))


def _write_text(path: Path, text: str) -> None:
    """All of `text` or the file as it was: a kill or a failure while writing leaves no half-written output."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ---- running ----------------------------------------------------------------------------------------------


def _bad_item(task: Task, item: Item, error: Exception) -> BadRecordError:
    reason = {MediaError: "corrupt_media", SequenceTooLongError: "too_long", MessageError: "malformed_message",
              FileNotFoundError: "missing_media"}
    kind = next((r for t, r in reason.items() if isinstance(error, t)), "invalid_sample")
    return BadRecordError(kind, f"{task.name}:{item.id}", str(error))


def _predict(task: Task, items: list[Item], predictor: Predictor, out: Path) -> list[Prediction]:
    if task.mode == "media":
        media = predictor.generate_media(items, task.modality)
        predictions = []
        for item, medium in zip(items, media):
            if medium is None:  # the model wrote none: a prediction with no file, which a judge scores wrong
                predictions.append(Prediction(item.id))
                continue
            rel = Path("media") / _safe(task.name) / f"{_safe(item.id)}{MEDIA_SUFFIX[task.modality]}"
            SAVERS[task.modality](medium, out / rel)
            predictions.append(Prediction(item.id, files=[rel.as_posix()]))
        return predictions
    if task.mode == "transcribe":
        texts = predictor.transcribe(items, task.max_new_tokens)
    elif task.mode in ("generate", "both"):
        texts = predictor.answer(items, task.max_new_tokens)
    else:
        texts = [None] * len(items)
    logprobs = predictor.choice_logprobs(items) if task.mode in ("likelihood", "both") else [None] * len(items)
    return [
        Prediction(i.id, text=t, choice=None if lp is None else max(range(len(lp)), key=lp.__getitem__), choice_logprobs=lp)
        for i, t, lp in zip(items, texts, logprobs)
    ]


def _predict_batch(task: Task, items: list[Item], predictor: Predictor, out: Path, bad: BadRecords) -> list[Prediction]:
    """Predict a batch; if it fails on bad input, item by item, so only the bad ones are skipped (or raised)."""
    errors = (MediaError, MessageError, SequenceTooLongError, FileNotFoundError)
    try:
        return _predict(task, items, predictor, out)
    except errors:
        pass  # some item is bad: retry one by one below, so only the bad ones are skipped (or raised)
    predictions = []
    for item in items:
        try:
            predictions += _predict(task, [item], predictor, out)
        except errors as e:
            bad(_bad_item(task, item, e))
    return predictions


def run_eval(
    tasks: Sequence[Task],
    predictor: Predictor,
    out: str | os.PathLike,
    *,
    model: str,
    batch_size: int = 8,
    limit: int | None = None,
    policy: Policy = "fail",
    overwrite: bool = False,
    progress: bool = True,
    report: bool = True,
) -> dict[str, dict[str, Any]]:
    """Predict every unfinished item (the first `limit` of each task), score each task, write the outputs."""
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch_size and limit must be positive, got {batch_size} and {limit}")
    out = output_folder(out)
    if overwrite:
        shutil.rmtree(out / "cache", ignore_errors=True)
        shutil.rmtree(out / "media", ignore_errors=True)
        (out / "run.json").unlink(missing_ok=True)
    _check_run(out, model, tasks)
    chosen = {t.name: t.items[:limit] for t in tasks}
    caches = {t.name: ItemCache(out / "cache" / f"{_safe(t.name)}.jsonl") for t in tasks}
    bads = {t.name: BadRecords(policy) for t in tasks}
    todo = sum(1 for t in tasks for i in chosen[t.name] if i.id not in caches[t.name].done)
    with tqdm(total=todo, desc="eval", unit="item", disable=not progress) as bar:
        for task in tasks:
            bar.set_postfix_str(task.name)
            pending = [i for i in chosen[task.name] if i.id not in caches[task.name].done]
            for start in range(0, len(pending), batch_size):
                batch = pending[start:start + batch_size]
                with torch.random.fork_rng():  # the caller's RNG stream is left as it was
                    torch.manual_seed(_batch_seed(task, batch))
                    caches[task.name].add(_predict_batch(task, batch, predictor, out, bads[task.name]))
                bar.update(len(batch))
    results, lines, skips = {}, [], {}
    for task in tasks:
        done = caches[task.name].done
        items = [i for i in chosen[task.name] if i.id in done]
        skipped = skips[task.name] = task.skipped + [str(e) for e in bads[task.name].skipped]
        if not items:
            results[task.name] = {"n": 0, "proxy": task.proxy, "skipped": len(skipped), "error": "no item could be run"}
            continue
        scores = score_task(task, items, [_absolute(done[i.id], out) for i in items])
        results[task.name] = scores.metrics | {"proxy": task.proxy} | ({"skipped": len(skipped)} if skipped else {})
        if scores.categories:
            results[task.name]["categories"] = scores.categories
        lines += [_prediction_line(task, item, done[item.id], scores) for item in items]
    _write_json(out / "results.json", results)
    _write_text(out / "predictions.jsonl", "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    if report:
        from mllm.eval.report import write_report

        write_report(out, tasks, results, {t.name: {i.id: i for i in chosen[t.name]} for t in tasks}, lines, skips)
    return results


def output_folder(out: str | os.PathLike) -> Path:
    """`out`, made if need be; an OutputFolderError naming the file in the way when it cannot be a folder."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        blocker = next((p for p in (out, *out.parents) if p.is_file()), out)
        raise OutputFolderError(f"cannot make the output folder {out}: {blocker} is a file") from e
    return out


def _absolute(prediction: Prediction, out: Path) -> Prediction:
    """The prediction with its files as absolute paths, for a judge to open."""
    return Prediction(prediction.id, prediction.text, prediction.choice, prediction.choice_logprobs,
                      [str(out / f) for f in prediction.files])


def score_task(task: Task, items: Sequence[Item], predictions: Sequence[Prediction]) -> Scores:
    """The task's scorer on its predictions; mode "both" scores the replies and, prefixed
    likelihood_, the most likely options, each on its own."""
    if task.mode != "both":
        return task.score(items, predictions)
    generated = task.score(items, [Prediction(p.id, text=p.text) for p in predictions])
    likely = task.score(items, [Prediction(p.id, choice=p.choice) for p in predictions])
    metrics = generated.metrics | {f"likelihood_{k}": v for k, v in likely.metrics.items() if k != "n"}
    categories = {c: m | {f"likelihood_{k}": v for k, v in likely.categories.get(c, {}).items() if k != "n"}
                  for c, m in generated.categories.items()}
    return Scores(metrics, generated.per_item, categories)


def _prediction_line(task: Task, item: Item, prediction: Prediction, scores: Scores) -> dict:
    line: dict[str, Any] = {"task": task.name, "id": item.id}
    if prediction.text is not None or prediction.choice is None:
        line["prediction"] = prediction.text
    if prediction.choice is not None:
        line["likelihood_choice"] = (item.choices or [])[prediction.choice]
    line["answer"] = item.answer
    if item.id in scores.per_item:
        line["score"] = scores.per_item[item.id]
    if item.id in scores.judged:
        line["judged"] = scores.judged[item.id]
    if prediction.files:
        line["files"] = prediction.files
    return line


def evaluate(
    model: str | os.PathLike | None,
    task_names: Sequence[str],
    out: str | os.PathLike,
    *,
    corpora: str | os.PathLike,
    limit: int | None = None,
    batch_size: int = 8,
    generate: Modality | None = None,
    policy: Policy = "fail",
    overwrite: bool = False,
    device: str | None = None,
    ctc_weight: float | None = None,
) -> dict[str, dict[str, Any]]:
    """`mllm eval`: load the checkpoint, read the tasks, run them (resuming from `out`), write the outputs.
    `ctc_weight`: of the joint CTC/attention decoding of transcriptions (default `CTC_WEIGHT`; 0: greedy)."""
    from mllm.eval.predictor import ModelPredictor
    from mllm.pipeline import CTC_WEIGHT, Pipeline

    if model is None:
        raise FileNotFoundError("no --model given, and no embedded default model is installed yet: pass a checkpoint directory")
    output_folder(out)  # before the slow part
    tasks = resolve_tasks(task_names, corpora=corpora, policy=policy, generate=generate)
    if not tasks:
        named = ", ".join(map(repr, task_names)) or "none"
        raise TaskListError(f"no task to run: of those named ({named}), every one was unknown and skipped")
    pipeline = Pipeline.from_pretrained(model, device=device)
    ctc_weight = CTC_WEIGHT if ctc_weight is None else ctc_weight
    predictor = ModelPredictor(pipeline.model, pipeline.processor, rows_per_forward=batch_size,
                               media_generator=pipeline.generate_media, ctc_weight=ctc_weight)
    # the decoding is part of what made the cached predictions
    return run_eval(tasks, predictor, out, model=f"{Path(model).resolve()} (ctc weight {ctc_weight})",
                    batch_size=batch_size, limit=limit, policy=policy, overwrite=overwrite)
