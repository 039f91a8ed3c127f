"""An lmms-eval model backed by an mllm checkpoint, so the whole lmms-eval suite can run against it.

    pip install lmms-eval
    lmms-eval --model mllm --model_args pretrained=runs/x/checkpoint,batch_size=4 --tasks mme,pope

lmms-eval finds models through the "lmms_eval.models" entry-point group; the
mllm package declares

    [project.entry-points."lmms_eval.models"]
    mllm = "mllm.eval.lmms_eval_plugin:manifest"

This module imports lmms_eval only when lmms-eval asks for the model, so it
costs nothing where lmms-eval is not installed. Visuals arrive as PIL images
(images), file paths (video, audio or images, by suffix) or {"array",
"sampling_rate"} dicts (audio, as HF datasets give them); `generate_until`
answers greedily and cuts the reply at the task's stop strings.

`loglikelihood` scores the continuation as the assistant's reply and returns
(negative log-likelihood, is_greedy): lmms-eval's multiple_choice scoring
takes the option with the *lowest* value (its bundled models return their
loss), so the NLL is what makes it pick the most likely option. (lmms-eval
0.7.3 itself stringifies every loglikelihood response in
`unwrap_generation_output`, which breaks its multiple_choice tasks for all
models; generate_until tasks run.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mllm.media import Audio, Image

VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".gif")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a")


def manifest():
    """The entry point: lmms-eval's registration record for the "mllm" model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mllm", simple_class_path=f"{__name__}.MllmModel")


def visual_part(visual: Any) -> dict:
    """One lmms-eval visual -> a message content part."""
    if isinstance(visual, dict) and "array" in visual and "sampling_rate" in visual:
        samples = np.asarray(visual["array"], dtype=np.float32)
        return {"type": "audio", "media": Audio(samples[None] if samples.ndim == 1 else samples, visual["sampling_rate"])}
    if isinstance(visual, (str, Path)):
        suffix = Path(visual).suffix.lower()
        kind = "video" if suffix in VIDEO_SUFFIXES else "audio" if suffix in AUDIO_SUFFIXES else "image"
        return {"type": kind, "path": str(visual)}
    if hasattr(visual, "convert"):  # a PIL image
        return {"type": "image", "media": Image(np.asarray(visual.convert("RGB")))}
    raise TypeError(f"the mllm model cannot read a {type(visual).__name__} visual")


def conversation(context: str, visuals: list | None) -> list[dict]:
    parts = [visual_part(v) for v in (visuals or []) if v is not None]
    return [{"role": "user", "content": parts + [{"type": "text", "text": context}]}]


def cut_at(text: str, stops: list[str]) -> str:
    """The text up to the first of the stop strings."""
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def _flatten(visuals: Any) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for x in visuals for v in _flatten(x)]
    return [visuals]


def _model_class() -> type:
    from lmms_eval.api.model import lmms

    from mllm.checkpoint import load_checkpoint
    from mllm.eval.predictor import ModelPredictor

    class MllmModel(lmms):
        """lmms-eval's "simple" model interface over ModelPredictor."""

        is_simple = True

        def __init__(self, pretrained: str, batch_size: int | str = 1, device: str | None = None,
                     max_new_tokens: int | str = 64, **kwargs):
            super().__init__()
            model, processor = load_checkpoint(pretrained, device=device)
            self.batch_size = int(batch_size)
            self.max_new_tokens = int(max_new_tokens)
            self.predictor = ModelPredictor(model, processor, rows_per_forward=self.batch_size)

        def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
            return _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))

        def generate_until(self, requests) -> list[str]:
            out = []
            for start in range(0, len(requests), self.batch_size):
                chunk = [r.args for r in requests[start:start + self.batch_size]]
                by_length: dict[int, list[int]] = {}
                for k, (_, gen_kwargs, *_rest) in enumerate(chunk):
                    by_length.setdefault(int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)), []).append(k)
                replies = [""] * len(chunk)
                for max_new_tokens, rows in by_length.items():
                    conversations = [conversation(chunk[k][0], self._visuals(*chunk[k][2:6])) for k in rows]
                    for k, text in zip(rows, self.predictor.complete(conversations, max_new_tokens)):
                        until = chunk[k][1].get("until") or []
                        replies[k] = cut_at(text, [until] if isinstance(until, str) else list(until))
                out += replies
            return out

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            conversations, replies = [], []
            for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
                doc = self.task_dict[task][split][doc_id]
                replies.append((target if isinstance(target, str) else target(doc)).strip())
                conversations.append(conversation(context, _flatten(doc_to_visual(doc))))
            return [(-logprob, greedy) for logprob, greedy in self.predictor.reply_logprobs(conversations, replies)]

        def generate_until_multi_round(self, requests) -> list[str]:
            raise NotImplementedError("the mllm lmms-eval model answers single-round tasks only")

    return MllmModel


def __getattr__(name: str) -> type:
    """`MllmModel` is built on first access, the moment lmms-eval imports it."""
    if name == "MllmModel":
        cls = _model_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
