"""Media tokenizers: image, video and audio to discrete codes or continuous features."""

# each module registers its tokenizers
from mllm.tokenizers import audio_codec, fsq_image, hf_codec, hf_vision, mel_latent, patch, query_image, resampler_image  # noqa: F401
from mllm.tokenizers import video_divot, video_divot_fsq  # noqa: F401
from mllm.tokenizers.base import (
    MediaTokenizer,
    build_media_tokenizer,
    list_media_tokenizers,
    load_media_tokenizer,
)

__all__ = ["MediaTokenizer", "build_media_tokenizer", "list_media_tokenizers", "load_media_tokenizer"]
