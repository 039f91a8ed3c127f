"""De-tokenizers: tokens back to images, video and audio (diffusion decoders, VQ and codec decoders)."""

from mllm.detokenizers import patch  # noqa: F401  (each module registers its de-tokenizers)
from mllm.detokenizers.base import DeTokenizer, build_detokenizer, list_detokenizers, load_detokenizer

__all__ = ["DeTokenizer", "build_detokenizer", "list_detokenizers", "load_detokenizer"]
