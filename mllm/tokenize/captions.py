"""Caption words as a tokenizer's text supervision (SEED-style): from its mean token, a throwaway linear layer
predicts the words of each medium's training captions, so the tokens say what they show, not only how it looks.

    vocabulary = CaptionVocabulary(corpora, ["video"], "video", min_count=3)
    vocabulary.target(path)                 -> [V] uniform over the distinct words of path's captions
    captioned_batches(paths, vocabulary, 8, seed=0, cache_size=4000, load=load_video)
                                            -> endless (media, word targets [B, V]) batches
    CaptionWords                            the `caption_words` / `min_word_count` keys of a stage-1 config
    reader = CaptionReader(feature_dim, len(vocabulary.words), weight=1.0)
    reader.add_loss({"mse": mse}, tokens, targets)   -> {"mse", "caption_words", "loss"}
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from mllm.losses import bag_of_words_loss
from mllm.tokenize.corpus_media import cached_loader, media_captions, shuffled_indices

M = TypeVar("M")


@dataclass
class CaptionWords:
    """A stage-1 config's caption supervision (its `caption_words` and `min_word_count` keys)."""

    caption_words: float = 0.0  # weight of the bag-of-words loss (0: MSE only)
    min_word_count: int = 3  # rarer caption words are left out of the vocabulary

    def __post_init__(self):
        if self.caption_words < 0 or self.min_word_count < 1:
            raise ValueError(f"need caption_words >= 0 and min_word_count >= 1, got {self.caption_words}, {self.min_word_count}")


def caption_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class CaptionVocabulary:
    """The words of the training media's captions: each medium's target is a distribution over them, uniform over
    the distinct words of all its captions (all zero for a medium with no caption record)."""

    def __init__(self, corpora_dir: Path, corpora: list[str], modality: str, min_count: int):
        self.captions = {p: texts for corpus in corpora
                         for p, texts in media_captions(corpora_dir, corpus, "train", modality).items()}
        counts = Counter(w for texts in self.captions.values() for text in texts for w in set(caption_words(text)))
        self.words = sorted(w for w, n in counts.items() if n >= min_count)
        if not self.words:
            raise ValueError(f"caption_words: no caption word occurs {min_count}+ times in {corpora}' train captions")
        self.index = {w: i for i, w in enumerate(self.words)}

    def target(self, path: Path) -> torch.Tensor:
        """[V] the word distribution of `path`'s captions."""
        found = {self.index[w] for text in self.captions.get(path, []) for w in caption_words(text) if w in self.index}
        target = torch.zeros(len(self.words))
        if found:
            target[list(found)] = 1 / len(found)
        return target


def captioned_batches(paths: list[Path], vocabulary: CaptionVocabulary, batch_size: int, seed: int, cache_size: int,
                      load: Callable[[Path], M], cache: dict[int, M] | None = None
                      ) -> Iterator[tuple[list[M], torch.Tensor]]:
    """shuffled_batches (the same batches, the same shared `cache`) with each batch's caption word targets [B, V]."""
    get = cached_loader(paths, cache_size, load, cache)
    for batch in shuffled_indices(len(paths), batch_size, seed):
        yield [get(j) for j in batch], torch.stack([vocabulary.target(paths[j]) for j in batch])


class CaptionReader(nn.Module):
    """A throwaway linear reader of caption words from the mean token; without a vocabulary, none."""

    def __init__(self, feature_dim: int, vocabulary: int = 0, weight: float = 0.0):
        super().__init__()
        self.words = nn.Linear(feature_dim, vocabulary) if vocabulary else None
        self.weight = weight

    def add_loss(self, losses: dict[str, torch.Tensor], tokens: torch.Tensor,
                 targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """losses["loss"] = losses["mse"] (+ weight × the caption words' loss of tokens [B, N, D] against targets [B, V])."""
        if self.words is not None:
            losses["caption_words"] = bag_of_words_loss(self.words(tokens.mean(1)), targets)
        losses["loss"] = losses["mse"] + self.weight * losses.get("caption_words", 0.0)
        return losses
