"""Interleaved generation with a KV cache: text, discrete code spans and continuous feature spans.

    results = generate(model, batch, GenerationConfig(max_new_tokens=128, eos_token_id=eos))
    results[0].items(processor.decode_text)   # ["A cat: ", MediaSpan("image", features [64, 256]), "."]

The engine sees only ids, masks and features, never media or tokenizers;
`MediaSpan`s go to the modality's DeTokenizer above this layer. `ctc_prefix_beam_search`
reads a transcript from the logits at a spoken item's slots instead (mllm.generation.ctc).
"""

from mllm.generation.config import GenerationConfig, HeadSampling, TokenSampling
from mllm.generation.ctc import ctc_log_likelihood, ctc_prefix_beam_search
from mllm.generation.engine import generate, greedy_generate
from mllm.generation.output import Generation, MediaSpan

__all__ = [
    "Generation",
    "GenerationConfig",
    "HeadSampling",
    "MediaSpan",
    "TokenSampling",
    "ctc_log_likelihood",
    "ctc_prefix_beam_search",
    "generate",
    "greedy_generate",
]
