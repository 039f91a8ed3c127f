"""Training, encoding, decoding and evaluating media tokenizers (`mllm tokenize ...`).

Importing this package registers every recipe module below.
"""

from mllm.tokenize import image_recipes  # noqa: F401  (registers image_fsq, image_query, image_diffusion)
from mllm.tokenize import audio_recipes  # noqa: F401  (registers audio_codec, audio_mel_diffusion)
from mllm.tokenize import video_recipes  # noqa: F401  (registers video_divot, video_fsq)
from mllm.tokenize import ink_invariance  # noqa: F401  (registers image_ink_invariance)
