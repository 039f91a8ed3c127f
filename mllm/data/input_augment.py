"""Training-time perturbation of what the user sends: each pass hears every spoken question in a new voice.

The token cache encodes each medium once, so a model trained from it hears the same few thousand clips every
epoch and learns their voices, not their words: held-out voices then read at twice the error (a CTC probe on
the embedded default's audio tokens: digit-string WER 0.29 as cached, 0.08 trained on perturbed clips). The
media of user turns are therefore loaded and perturbed afresh on each pass, and the processor encodes them;
the media the assistant writes (the heads' targets) and validation records stay as cached.

    augment = InputAugment(InputAugmentConfig(audio=AudioPerturb(speed=(0.85, 1.15))), processor, seed=epoch)
    messages = augment(record.messages, record.base_dir)  # user audio -> {"type": "audio", "media": Audio}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from mllm.augment import AudioPerturb, perturb_audio
from mllm.media import Audio
from mllm.processor import Processor, part_notes


@dataclass
class InputAugmentConfig:
    audio: AudioPerturb = field(default_factory=AudioPerturb)  # of every audio part in a user turn

    @property
    def enabled(self) -> bool:
        return self.audio.enabled


class InputAugment:
    """Replaces each audio part of the user turns with its perturbed medium, drawn from one seeded generator:
    a pass replayed from its seed (a resumed run) hears the same voices."""

    def __init__(self, cfg: InputAugmentConfig, processor: Processor, seed: int):
        self.cfg, self.processor = cfg, processor
        self.rng = np.random.default_rng([seed, 0x6175])

    def __call__(self, messages: list[dict], base_dir: str | os.PathLike | None) -> list[dict]:
        if not self.cfg.enabled:  # nothing to perturb: the parts keep their sources, so the cache still serves them
            return messages
        return [{**m, "content": [self._part(p, base_dir, f"messages[{i}].content[{j}]") for j, p in enumerate(m["content"])]}
                if m.get("role") == "user" and isinstance(m.get("content"), list) else m
                for i, m in enumerate(messages)]

    def _part(self, part: dict, base_dir: str | os.PathLike | None, where: str) -> dict:
        if part.get("type") != "audio" or "tokens" in part:
            return part
        audio = self.processor.load_medium(part, "audio", where, base_dir)
        perturbed = Audio(perturb_audio(audio.samples, self.cfg.audio, audio.sample_rate, self.rng), audio.sample_rate)
        return {"type": "audio", "media": perturbed} | part_notes(part)
