"""De-tokenizers: tokens back to images, video and audio (diffusion decoders, VQ and codec decoders)."""

# each module registers its de-tokenizers
from mllm.detokenizers import audio_codec, diffusion_image, diffusion_mel, hf_codec, patch, vq_image  # noqa: F401
from mllm.detokenizers import diffusion_video, vq_video  # noqa: F401
from mllm.detokenizers.base import DeTokenizer, build_detokenizer, list_detokenizers, load_detokenizer

__all__ = ["DeTokenizer", "build_detokenizer", "list_detokenizers", "load_detokenizer"]
