"""What one server accepts, named after vLLM's and TGI's flags where they have one."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

MODALITIES = ("image", "audio", "video")  # kept literal: `mllm --help` reads the defaults without importing torch


def _default_mm() -> dict[str, int]:
    return {"image": 4, "audio": 2, "video": 1}


@dataclass(frozen=True)
class ServeLimits:
    limit_mm_per_prompt: dict[str, int] = field(default_factory=_default_mm)  # vLLM: media items per request, by modality
    max_request_bytes: int = 32 * 2**20  # whole HTTP body; also each medium's encoded bytes
    max_image_pixels: int = 4096 * 4096  # each image as decoded (RGB: 48 MiB)
    max_video_frames: int = 256  # frames of one video as held: a frame-sampling tokenizer's (8), else all
    max_video_frame_pixels: int = 1280 * 720  # each frame of a video (a video then decodes to at most 675 MiB)
    max_input_tokens: int = 4096  # TGI: prompt tokens, media spans included
    max_total_tokens: int = 4608  # TGI: prompt tokens + max_tokens
    request_timeout_s: float = 120.0  # from admission: a body still arriving then gets 408; loading or generating, 504
    max_concurrent_requests: int = 8  # TGI: requests admitted at once (running or queued); more get 429
    allowed_local_media_path: Path | None = None  # vLLM: file:// and plain paths must lie under it; None: refused

    def __post_init__(self):
        unknown = set(self.limit_mm_per_prompt) - set(MODALITIES)
        if unknown:
            raise ValueError(f"limit_mm_per_prompt: unknown modalities {sorted(unknown)} (expected {list(MODALITIES)})")
        if any(n < 0 for n in self.limit_mm_per_prompt.values()):
            raise ValueError("limit_mm_per_prompt: counts must be >= 0")
        sizes = {"max_request_bytes": self.max_request_bytes, "max_image_pixels": self.max_image_pixels,
                 "max_video_frames": self.max_video_frames, "max_video_frame_pixels": self.max_video_frame_pixels,
                 "max_input_tokens": self.max_input_tokens, "max_total_tokens": self.max_total_tokens,
                 "max_concurrent_requests": self.max_concurrent_requests}
        if min(sizes.values()) <= 0:
            raise ValueError(f"{', '.join(k for k, v in sizes.items() if v <= 0)} must be positive")
        if self.max_total_tokens <= self.max_input_tokens:
            raise ValueError(f"max_total_tokens ({self.max_total_tokens}) must exceed max_input_tokens ({self.max_input_tokens})")
        if not 0 < self.request_timeout_s < math.inf:  # NaN too: every deadline would be NaN
            raise ValueError(f"request_timeout_s must be positive and finite, got {self.request_timeout_s}")

    def items_allowed(self, modality: str) -> int:
        return self.limit_mm_per_prompt.get(modality, 0)


def parse_mm_limits(text: str) -> dict[str, int]:
    """vLLM's `--limit-mm-per-prompt` value: JSON ('{"image": 4}') or 'image=4,audio=1'."""
    text = text.strip()
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict) or not all(isinstance(v, int) for v in value.values()):
            raise ValueError(f"expected a JSON object of integers, got {text!r}")
        return value
    limits = {}
    for item in filter(None, text.split(",")):
        name, _, count = item.partition("=")
        if not count.strip().isdigit():
            raise ValueError(f"expected modality=count, got {item!r}")
        limits[name.strip()] = int(count)
    return limits
