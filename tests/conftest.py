"""Shared fixtures: tiny LM configs built in code and the real Mistral v1 tokenizer."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

# Three architectures the wrapper must serve unchanged; a few hundred thousand parameters each.
TINY_LMS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=32000, max_position_embeddings=512),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=32000, max_position_embeddings=512,
                    sliding_window=None),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=32000, max_position_embeddings=512,
                  tie_word_embeddings=True),
}


@pytest.fixture(scope="session")
def mistral_tokenizer_dir(tmp_path_factory) -> Path:
    """The Mistral-7B v0.1 SentencePiece tokenizer shipped in the mistral-common wheel, as a HF directory."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        pytest.fail("mistral-common is not installed: pip install --no-deps 'mistral-common>=1.5,<2'")
    model = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    out = tmp_path_factory.mktemp("mistral_tokenizer")
    shutil.copy(model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    return out


@pytest.fixture(params=sorted(TINY_LMS))
def arch(request) -> str:
    return request.param
