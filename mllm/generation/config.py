"""What generation does, as typed dataclasses (they round-trip through YAML with mllm.config)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenSampling:
    """How one kind of token, text or media codes, is drawn from the logits."""

    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely; 0: all
    top_p: float = 1.0  # keep the smallest set with this much probability
    repetition_penalty: float = 1.0  # CTRL/HF: seen tokens' positive logits ÷ p, negative ones × p
    cfg_scale: float = 1.0  # classifier-free guidance on log-probabilities; 1: none

    def __post_init__(self):
        _finite(self, "temperature", "repetition_penalty", "cfg_scale")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(
                f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1 and repetition_penalty > 0, "
                f"got {self.temperature}, {self.top_k}, {self.top_p} and {self.repetition_penalty}"
            )


@dataclass
class HeadSampling:
    """How continuous features are drawn from the output heads."""

    temperature: float | None = None  # None: each head's own (its config's temperature)
    cfg_scale: float = 1.0  # passed to head.sample as `cfg`; 1: none
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # modality -> extra head.sample keywords,
    # e.g. {"image": {"steps": 50}} for a diffusion head, {"image": {"mode": "mean"}} for a GMM head

    def __post_init__(self):
        _finite(self, "cfg_scale", *([] if self.temperature is None else ["temperature"]))
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (or None: each head's own), got {self.temperature}")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256  # every position counts: text, markers, codes, features
    eos_token_id: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)  # more ids that end a reply as eos does
    pad_token_id: int | None = None  # fed to finished rows and used for padding; default eos, else 0
    stop_strings: list[str] = field(default_factory=list)  # end a row once its text contains one (needs decode_text)
    text: TokenSampling = field(default_factory=TokenSampling)
    codes: TokenSampling = field(default_factory=TokenSampling)
    continuous: HeadSampling = field(default_factory=HeadSampling)
    use_cache: bool = True  # False recomputes the whole sequence every step: the reference, and a benchmark baseline
    seed: int | None = None  # seeds one torch.Generator for every draw; None: the global RNG
    writes: list[str] | None = None  # the media a reply may open; None: every one the model can write, []: text only

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.writes is not None and not (isinstance(self.writes, list)
                                            and all(isinstance(m, str) for m in self.writes)):
            raise ValueError(f"writes must be a list of modality names or None, got {self.writes!r}")
        if any(not _token_id(i) for i in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (non-negative integers), got {self.stop_token_ids}")
        for name in ("eos_token_id", "pad_token_id"):  # a finished row is fed the pad, which defaults to eos
            value = getattr(self, name)
            if value is not None and not _token_id(value):
                raise ValueError(f"{name} must be a token id (a non-negative integer) or None, got {value!r}")

    @property
    def guided(self) -> bool:
        """Whether any scale asks for the unconditional stream."""
        return any(s != 1.0 for s in (self.text.cfg_scale, self.codes.cfg_scale, self.continuous.cfg_scale))


def _finite(sampling, *names: str) -> None:
    """Refuse a NaN or infinite setting by name: NaN passes every comparison check (a NaN repetition penalty made
    argmax pick a seen token every step) and an infinite temperature turns the masked logits' −inf into NaN."""
    for name in names:
        if not math.isfinite(getattr(sampling, name)):
            raise ValueError(f"{name} must be a finite number, got {getattr(sampling, name)}")


def _token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
