"""Evaluation: benchmarks read from their native files, offline proxies, scorers, a resumable runner, reports.

    mllm eval --model runs/x/checkpoint --tasks pope_proxy eval/tasks/mme.yaml mine.jsonl --out runs/eval

    from mllm.eval import ModelPredictor, resolve_tasks, run_eval
    tasks = resolve_tasks(["pope_proxy"], corpora=Path.home() / ".cache/mllm/corpora")
    results = run_eval(tasks, ModelPredictor(model, processor), "runs/eval", model="runs/x/checkpoint")

See docs/eval.md for pointing each loader at a local benchmark download.
"""

from mllm.eval.predictor import ModelPredictor, Predictor
from mllm.eval.runner import resolve_tasks, run_eval
from mllm.eval.tasks import Item, MediaRef, Prediction, Scores, Task, TaskSpec, list_tasks, load_task_spec

__all__ = [
    "Item",
    "MediaRef",
    "ModelPredictor",
    "Prediction",
    "Predictor",
    "Scores",
    "Task",
    "TaskSpec",
    "list_tasks",
    "load_task_spec",
    "resolve_tasks",
    "run_eval",
]
