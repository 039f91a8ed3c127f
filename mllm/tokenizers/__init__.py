"""Media tokenizers: image, video and audio to discrete codes or continuous features."""

from mllm.tokenizers import patch  # noqa: F401  (registers its tokenizer)
from mllm.tokenizers.base import (
    MediaTokenizer,
    build_media_tokenizer,
    list_media_tokenizers,
    load_media_tokenizer,
)

__all__ = ["MediaTokenizer", "build_media_tokenizer", "list_media_tokenizers", "load_media_tokenizer"]
