"""Discrete video tokenizer: the Divot encoder's N clip tokens, each quantised by FSQ to one code.

    clip -> video_divot encoder -> [N, D] -> Linear -> [N, len(levels)] -> FSQ -> N codes in [0, prod(levels))

Finite scalar quantisation (as `fsq_image`): every dimension is rounded
onto levels[i] values and a token is the mixed-radix index of the rounded
vector; no learned codebook, so no code can die. The codes splice into the
LM's vocabulary like image codes. The pixel decoder is the `vq_video`
de-tokenizer; recipe `video_fsq` trains both jointly (straight-through).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from vector_quantize_pytorch import FSQ

from mllm.media import Video
from mllm.tokenizers.base import register
from mllm.tokenizers.video_divot import VideoDivotConfig, VideoDivotTokenizer, clip_batch


@dataclass
class VideoDivotFSQConfig(VideoDivotConfig):
    levels: tuple[int, ...] = (8, 5, 5, 5)  # codebook size = prod(levels); feature_dim is the width before quantising

    def __post_init__(self):
        super().__post_init__()
        if not self.levels or min(self.levels) < 2:
            raise ValueError(f"levels must be a non-empty list of integers >= 2, got {list(self.levels)}")


@register
class VideoDivotFSQTokenizer(VideoDivotTokenizer):
    name = "video_divot_fsq"
    kind = "discrete"
    config_class = VideoDivotFSQConfig

    def __init__(self, config: VideoDivotFSQConfig):
        super().__init__(config)
        self.to_code = nn.Linear(self.config.feature_dim, len(self.config.levels))
        self.fsq = FSQ(list(self.config.levels))

    @property
    def feature_dim(self) -> int:
        raise AttributeError(f"{self.name} is discrete: it has no feature dimension")

    @property
    def codebook_size(self) -> int:
        return math.prod(self.config.levels)

    @property
    def code_dim(self) -> int:
        return len(self.config.levels)

    @property
    def codebook(self) -> torch.Tensor:
        """[K, C]: the vector every code stands for."""
        return self.fsq.implicit_codebook

    def quantize(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """clips [B, T, 3, S, S] in [0, 1] -> (vectors [B, N, C] with straight-through gradients, codes [B, N])."""
        vectors, codes = self.fsq(self.to_code(self.features(clips)))
        return vectors, codes.long()

    @torch.no_grad()
    def encode_batch(self, videos: list[Video]) -> torch.Tensor:
        """LongTensor [B, N] of codes in [0, codebook_size)."""
        return self.quantize(clip_batch(videos, self.config.frames, self.frame_size, self.name))[1]
