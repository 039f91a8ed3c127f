"""Train a small SentencePiece text tokenizer and save it as a HF tokenizer directory.

The embedded default's base LM is pretrained by the project itself, so its
text tokenizer is too: byte-fallback BPE (never an unknown character), digits
split one per token, Llama's special ids (unk 0, bos 1, eos 2).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable

import sentencepiece as spm


def train_text_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 2000) -> Path:
    """Learn a BPE vocabulary of `vocab_size` from `texts`; write tokenizer.model + tokenizer_config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t for t in texts if t.strip()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        shuffle_input_sentence=False,  # deterministic: the same texts give the same vocabulary
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return out
