"""Randomly initialised models and synthetic batches for the timing sections: speed does not depend on weights.

One Llama-style LM carries three media modalities, as the real configurations do:

    image  continuous, 64-d features in, GMM head out (Divot)
    video  continuous, 64-d features, MAR-style diffusion head
    audio  discrete, 1024 codes added to the vocabulary

A synthetic training row of T tokens (labels on text and codes) reads

    text · <image> 16 × feature </image> · text · <audio> 32 codes </audio> · <video> 16 × target </video> · text
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from mllm.model import MultimodalLM
from mllm.sequence import IGNORE_INDEX, MultimodalBatch
from mllm.vocab import ModalitySpec, VocabLayout

CODES, FEATURE_DIM, SPAN = 1024, 64, 16
SPECS = [
    ModalitySpec("image", "continuous", feature_dim=FEATURE_DIM),
    ModalitySpec("video", "continuous", feature_dim=FEATURE_DIM),
    ModalitySpec("audio", "discrete", codebook_size=CODES),
]
HEADS = {
    "image": {"name": "gmm", "options": {"num_components": 16, "width": 512, "depth": 2}},
    "video": {"name": "diffusion", "options": {"width": 512, "depth": 3}},
}


def llama(hidden: int, layers: int, vocab: int = 32000, positions: int = 4096) -> dict:
    """A Llama config dict: head size 64, MLP 8/3 × hidden rounded to 16."""
    return dict(model_type="llama", hidden_size=hidden, intermediate_size=(8 * hidden // 3 + 15) // 16 * 16,
                num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                num_key_value_heads=max(hidden // 64, 1), vocab_size=vocab, max_position_embeddings=positions)


class CountingVocab:
    """The part of a HF tokenizer that VocabLayout.extend uses: a plain text vocabulary of `size` tokens."""

    def __init__(self, size: int):
        self.vocab = {f"t{i}": i for i in range(size)}

    def __len__(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return self.vocab

    def add_tokens(self, tokens, special_tokens) -> None:
        for t in tokens:
            self.vocab.setdefault(t.content, len(self.vocab))

    def convert_tokens_to_ids(self, tokens) -> list[int]:
        return [self.vocab[t] for t in tokens]


def base_lm(lm: dict, vocab_size: int | None = None, attn: str = "sdpa") -> PreTrainedModel:
    """A random HF causal LM from a config dict; `vocab_size` overrides its vocabulary."""
    config = dict(lm, **({"vocab_size": vocab_size} if vocab_size else {}))
    text_config = AutoConfig.for_model(config.pop("model_type"), **config)
    return AutoModelForCausalLM.from_config(text_config, attn_implementation=attn)


def multimodal(lm: dict, tokens_per_item: int = SPAN, attn: str = "sdpa", seed: int = 0) -> MultimodalLM:
    torch.manual_seed(seed)
    layout = VocabLayout.extend(CountingVocab(lm["vocab_size"]), SPECS)
    per_item = dict.fromkeys(("image", "video", "audio"), tokens_per_item)
    return MultimodalLM.from_base(base_lm(lm, attn=attn), layout, heads=HEADS, tokens_per_item=per_item)


def text_batch(rows: int, length: int, vocab: int, seed: int = 0) -> MultimodalBatch:
    """Random text ids [rows, length], every position labelled."""
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    return MultimodalBatch(ids, torch.ones_like(ids), ids.clone())


def multimodal_batch(model: MultimodalLM, rows: int, length: int, seed: int = 0) -> MultimodalBatch:
    """[rows, length] with an image span in, an audio code span and a video target span (see the module doc)."""
    layout, g = model.layout, torch.Generator().manual_seed(seed)
    media = 3 * 2 + 2 * SPAN + 2 * SPAN  # markers, image and video slots, audio codes
    if length < media + 4:
        raise ValueError(f"length {length} is too short for the {media} media positions of a row")
    batch = text_batch(rows, length, layout.text_vocab_size, seed)
    ids, labels = batch.input_ids, batch.labels
    text = (length - media) // 3
    image, audio, video = layout["image"], layout["audio"], layout["video"]
    spans = [
        [image.begin_id, *[image.placeholder_id] * SPAN, image.end_id],
        [audio.begin_id, *(audio.code_offset + torch.randint(0, CODES, (2 * SPAN,), generator=g)).tolist(), audio.end_id],
        [video.begin_id, *[video.placeholder_id] * SPAN, video.end_id],
    ]
    start = text
    for i, span in enumerate(spans):
        ids[:, start : start + len(span)] = torch.tensor(span)
        if i != 1:  # continuous slots carry no CE label
            labels[:, start : start + len(span)] = IGNORE_INDEX
        start += len(span) + text
    n = rows * SPAN
    features = {m: torch.randn(n, FEATURE_DIM, generator=g) for m in ("image", "video")}
    targets = {"image": torch.zeros(n, dtype=torch.bool), "video": torch.ones(n, dtype=torch.bool)}
    return MultimodalBatch(ids, batch.attention_mask, labels, None, features, targets)


def prompt(model: MultimodalLM, rows: int, length: int, opening: str | None = None) -> MultimodalBatch:
    """Random text prompts [rows, length], ending in `opening`'s begin token when given."""
    batch = text_batch(rows, length, model.layout.text_vocab_size, seed=1)
    if opening is not None:
        batch.input_ids[:, -1] = model.layout[opening].begin_id
    return MultimodalBatch(batch.input_ids, batch.attention_mask)
