"""A stand-in for the embedded default model, built in code: the sizes of the tiny demo model.

    Llama hidden 128, MLP 384, 4 layers, 4 heads (2 KV), 512 positions; a SentencePiece
    BPE text vocabulary of 1000 learned from the built corpora's text; raw 8×8 patches
    of 32×32 images as continuous image tokens.

It is saved as a Pipeline checkpoint, so the memory section loads it exactly as it
would load the default model or any other given with `--model DIR`.
"""

from __future__ import annotations

import json
from pathlib import Path

from mllm.checkpoint import MediaConfig, ModelConfig, build_model
from mllm.pipeline import Pipeline
from mllm.tokenizers.text import train_text_tokenizer

DEMO_LLAMA = dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, vocab_size=1000)
PATCH = {"image_size": 32, "patch_size": 8}


def build_standin(corpora: Path, out: Path) -> Path:
    """Write the stand-in checkpoint to `out` (once) and return it."""
    if (out / "config.json").is_file():
        return out
    lines = (corpora / "text" / "train.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()]
    tokenizer = train_text_tokenizer(texts, out.with_name(f"{out.name}_tokenizer"), vocab_size=DEMO_LLAMA["vocab_size"])
    model, processor = build_model(ModelConfig(base_config=DEMO_LLAMA, tokenizer=str(tokenizer),
                                               media={"image": MediaConfig(tokenizer="patch", options=PATCH)}))
    Pipeline(model, processor).save_pretrained(out)
    return out
