"""Continuous output heads: hidden states [M, H] -> features [M, D], interchangeable by config.

    build_head("gmm", {"hidden_size": 4096, "feature_dim": 256, "num_components": 16})
    list_heads()  # ['diffusion', 'gmm', 'regression']
"""

from mllm.heads import diffusion, gmm, regression  # noqa: F401  (registers the heads)
from mllm.heads.base import HEADS, Head, build_head, list_heads, load_head, register

__all__ = ["HEADS", "Head", "build_head", "list_heads", "load_head", "register"]
