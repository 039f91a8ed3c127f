"""Transcript supervision for audio tokens: a CTC loss over characters, read from the latents.

A β-VAE trained only to reconstruct log-mel says how a clip sounds, not which
words it holds, and a tiny LM cannot learn speech recognition from it inside a
task mixture. CosyVoice's supervised semantic tokens are trained with an ASR
loss; this is the small version: a throwaway linear layer reads characters from
each latent (CTC), so the latents the LM sees say what is spoken.

    transcribed_clips(corpora, "train", 16000)  -> [(wave [N], "three six zero"), ...]
    transcript_batches(clips, 16, seed=0)       -> endless TranscriptBatch (padded waves or latents + character targets)
    greedy_ctc(logits [T, C])                   -> text
    linear_ctc_probe_cer(train, test)            -> character error rate of a linear CTC probe on frozen latents
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from mllm.losses import ctc_loss
from mllm.media import load_audio
from mllm.tokenize.corpus_media import corpus_media

ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"  # class k + 1 is ALPHABET[k]; class 0 is CTC's blank
NUM_CLASSES = len(ALPHABET) + 1


def encode_text(text: str) -> list[int]:
    """Lower-cased characters of ALPHABET as CTC classes (1 ...); anything else (digits, punctuation) dropped."""
    kept = "".join(c for c in text.lower() if c in ALPHABET)
    return [ALPHABET.index(c) + 1 for c in " ".join(kept.split())]


def transcribed_clips(corpora_dir: Path, split: str, sample_rate: int, corpus: str = "speech",
                      limit: int | None = None) -> list[tuple[torch.Tensor, str]]:
    """(mono waveform [N] at sample_rate, transcript) for each audio file of the split whose record has one."""
    media = [(path, meta["transcript"]) for path, meta in corpus_media(corpora_dir, corpus, split, "audio").items()
             if meta.get("transcript") and encode_text(meta["transcript"])][:limit]
    return [(torch.from_numpy(load_audio(p, sample_rate=sample_rate).samples[0]), text)
            for p, text in tqdm(media, desc=f"load transcribed {split} audio")]


@dataclass
class TranscriptBatch:
    inputs: torch.Tensor  # [B, L, ...] zero-padded: waveforms [B, L] or latents [B, T, D]
    lengths: torch.Tensor  # [B] samples (or frames) of each row before the padding
    targets: torch.Tensor  # [ΣS] character classes, concatenated
    target_lengths: torch.Tensor  # [B]

    def frames(self, samples_per_frame: int) -> torch.Tensor:
        """[B]: how many latent frames each clip fills (the rest of its row is padding)."""
        return (self.lengths + samples_per_frame - 1) // samples_per_frame


def collate(clips: list[tuple[torch.Tensor, str]]) -> TranscriptBatch:
    """(sequence [L, ...], transcript) pairs -> one padded batch with concatenated character targets."""
    targets = [torch.tensor(encode_text(text)) for _, text in clips]
    return TranscriptBatch(
        inputs=nn.utils.rnn.pad_sequence([x for x, _ in clips], batch_first=True),
        lengths=torch.tensor([len(x) for x, _ in clips]),
        targets=torch.cat(targets),
        target_lengths=torch.tensor([len(t) for t in targets]),
    )


def transcript_batches(clips: list[tuple[torch.Tensor, str]], batch_size: int, seed: int) -> Iterator[TranscriptBatch]:
    """Endless batches of whole clips, drawn uniformly with a seeded generator."""
    if not clips:
        raise ValueError("no transcribed clips to train on (the speech corpus' records need meta.transcript)")
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield collate([clips[i] for i in torch.randint(len(clips), (batch_size,), generator=gen).tolist()])


def greedy_ctc(logits: torch.Tensor) -> str:
    """Best path [T, C] -> text: repeats merged, blanks dropped."""
    best = logits.argmax(-1).tolist()
    return "".join(ALPHABET[k - 1] for i, k in enumerate(best) if k and (i == 0 or k != best[i - 1]))


def linear_ctc_probe_cer(train: list[tuple[torch.Tensor, str]], test: list[tuple[torch.Tensor, str]],
                         steps: int = 400, batch_size: int = 64, seed: int = 0) -> float:
    """How plainly latents say what is spoken: a linear CTC classifier over standardised latents [T, D], fit on
    `train` (Adam, seeded), its character error rate (jiwer) on `test`, decoded greedily; NaN for no `test` clips
    (jiwer scores no clips 0: a perfect probe)."""
    import jiwer

    if not train:
        raise ValueError("linear CTC probe: no transcribed train clips to fit it on")
    if not test:
        return float("nan")
    latents = torch.cat([x for x, _ in train])
    mean, std = latents.mean(0), latents.std(0).clamp_min(1e-6)
    torch.manual_seed(seed)
    probe = nn.Linear(latents.shape[1], NUM_CLASSES)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for batch in tqdm(itertools.islice(transcript_batches(train, batch_size, seed), steps), total=steps,
                      desc="linear CTC probe"):
        loss = ctc_loss(probe((batch.inputs - mean) / std), batch.lengths, batch.targets, batch.target_lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        hypotheses = [greedy_ctc(probe((x - mean) / std)) for x, _ in test]
    references = ["".join(ALPHABET[k - 1] for k in encode_text(t)) for _, t in test]
    return float(jiwer.cer(references, [h if h.strip() else "-" for h in hypotheses]))

