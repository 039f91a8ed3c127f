"""An independent spoken-digit classifier, to judge whether audio reconstructions stay intelligible.

    judge = SpokenDigitJudge.load_or_train(corpora_dir)   # trains once, then loads from the cache
    digits = judge.predict(clips)                          # list[Audio] -> list[int] in 0..9

It is a small CNN on log-mel spectrograms, trained only on original synthesized
audio: the single-digit utterances ("seven") of the speech corpus's train
split, in its espeak-ng and Flite voices, never on a model's output. Its features are its own (40 mel bands,
25 ms windows, per-clip level normalisation), not any tokenizer's. Training
augments the originals with time shifts, white noise and SpecAugment masks.

The trained judge is cached as `$MLLM_CACHE/judges/spoken_digits-<fingerprint>/`,
where the fingerprint hashes the judge's config and the bytes and labels of
every training clip: a rebuilt corpus with other audio trains a new judge.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mllm.config import to_dict
from mllm.media import Audio, MediaError, load_audio
from mllm.module import WEIGHTS_FILE, ConfiguredModule

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class JudgeConfig:
    sample_rate: int = 16000
    n_mels: int = 40
    win_length: int = 400  # 25 ms
    hop_length: int = 160  # 10 ms
    seconds: float = 1.0  # clips are centred in (or cut to the loudest) window of this length
    floor_db: float = 80.0  # log-mel is clamped at this many dB below the clip's peak
    channels: tuple[int, ...] = (16, 32, 64, 64)
    epochs: int = 40
    batch_size: int = 32
    lr: float = 2e-3
    noise_prob: float = 0.5  # share of training clips with white noise added, at 10-40 dB SNR
    seed: int = 0


def cache_root() -> Path:
    return Path(os.environ.get("MLLM_CACHE") or Path.home() / ".cache" / "mllm") / "judges"


def single_digit_clips(corpora_dir: str | os.PathLike, split: str) -> list[tuple[Path, int]]:
    """(wav path, digit) of every single-digit utterance in speech/<split>.jsonl, each file once, sorted."""
    records = Path(corpora_dir) / "speech" / f"{split}.jsonl"
    if not records.is_file():
        raise FileNotFoundError(f"{records}: no speech corpus here (build one with `mllm data build`)")
    clips = {}
    for line in records.read_text().splitlines():
        record = json.loads(line)
        transcript = record.get("meta", {}).get("transcript")
        if transcript not in DIGIT_WORDS:
            continue
        for message in record["messages"]:
            for part in message["content"]:
                if part.get("type") == "audio":
                    clips[records.parent / part["path"]] = DIGIT_WORDS.index(transcript)
    return sorted(clips.items())


class SpokenDigitJudge(ConfiguredModule):
    name = "spoken_digits"
    config_class = JudgeConfig
    config_file = "judge.yaml"

    def __init__(self, config: JudgeConfig):
        super().__init__(config)
        c = config
        basis = librosa.filters.mel(sr=c.sample_rate, n_fft=512, n_mels=c.n_mels, fmin=20, fmax=c.sample_rate / 2)
        self.register_buffer("basis", torch.from_numpy(basis), persistent=False)  # [n_mels, 257]
        self.register_buffer("window", torch.hann_window(c.win_length), persistent=False)
        layers, width = [], 1
        for ch in c.channels:
            layers += [nn.Conv2d(width, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(), nn.MaxPool2d(2)]
            width = ch
        self.cnn = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(width, 10))

    @property
    def window_samples(self) -> int:
        return round(self.config.seconds * self.config.sample_rate)

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, N] -> log-mel in dB below each clip's peak, scaled to [-1, 0]: [B, 1, n_mels, frames]."""
        c = self.config
        power = torch.stft(wave, 512, c.hop_length, c.win_length, self.window, return_complex=True).abs().pow(2)
        db = 10 * torch.log10((self.basis @ power).clamp(min=1e-10))
        db = db - db.amax(dim=(1, 2), keepdim=True)
        return (db.clamp(min=-c.floor_db) / c.floor_db)[:, None]

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, N] -> logits [B, 10]."""
        return self.cnn(self.features(wave))

    def fit_window(self, samples: np.ndarray) -> np.ndarray:
        """[N] -> [window]: centred in silence if shorter, else the loudest window."""
        n, w = len(samples), self.window_samples
        if n <= w:
            start = (w - n) // 2
            return np.pad(samples, (start, w - n - start))
        energy = np.convolve(samples**2, np.ones(w), mode="valid")  # [N - w + 1]
        start = int(energy.argmax())
        return samples[start: start + w]

    @torch.no_grad()
    def predict(self, clips: list[Audio]) -> list[int]:
        """The digit (0-9) heard in each clip; clips may have any rate and channel count."""
        waves = []
        for i, clip in enumerate(clips):
            if not isinstance(clip, Audio):
                raise MediaError(f"<clips[{i}]>", f"expected an Audio, got {type(clip).__name__}")
            mono = clip.to_mono().resample(self.config.sample_rate)
            waves.append(self.fit_window(mono.samples[0]))
        if not waves:
            return []
        self.eval()
        return self(torch.from_numpy(np.stack(waves))).argmax(-1).tolist()

    def accuracy(self, clips: list[Audio], digits: list[int]) -> float:
        """Share of clips whose digit the judge hears right; NaN for no clips."""
        if len(clips) != len(digits):  # numpy would broadcast a single digit over every clip
            raise ValueError(f"spoken-digit judge: need one digit per clip, got {len(digits)} for {len(clips)} clips")
        return float(np.mean(np.array(self.predict(clips)) == np.array(digits))) if clips else float("nan")

    # ---------------------------------------------------------------- training and the cache

    @classmethod
    def load_or_train(cls, corpora_dir: str | os.PathLike, config: JudgeConfig | None = None,
                      cache_dir: str | os.PathLike | None = None) -> SpokenDigitJudge:
        """The judge for this corpus's train split: loaded from the cache, or trained (about a minute) and cached."""
        config = config or JudgeConfig()
        train = single_digit_clips(corpora_dir, "train")
        if len({d for _, d in train}) < 10:
            raise ValueError(f"{corpora_dir}: the speech train split must hold single-digit utterances of all ten digits")
        path = Path(cache_dir or cache_root()) / f"spoken_digits-{fingerprint(train, config)}"
        if (path / WEIGHTS_FILE).is_file():
            return cls.from_pretrained(path)
        judge = cls(config)
        judge.fit(train)
        judge.save_cached(path)
        return judge

    def save_cached(self, path: Path) -> Path:
        """`save_pretrained` into a temporary sibling of `path`, then renamed into place: a reader of the cache
        finds a whole judge or none."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            self.save_pretrained(tmp)
            if path.exists():  # a judge directory without its weights
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def fit(self, clips: list[tuple[Path, int]]) -> None:
        """Train on original (path, digit) clips, with augmentation of those originals only."""
        c = self.config
        gen = torch.Generator().manual_seed(c.seed)
        torch.manual_seed(c.seed)
        waves = [load_audio(p, sample_rate=c.sample_rate).samples[0][: self.window_samples] for p, _ in clips]
        labels = torch.tensor([d for _, d in clips])
        opt = torch.optim.AdamW(self.parameters(), lr=c.lr, weight_decay=1e-2)
        steps = c.epochs * -(-len(clips) // c.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, c.lr, total_steps=steps)
        self.train()
        bar = tqdm(total=steps, desc="spoken-digit judge")
        for _ in range(c.epochs):
            for batch in torch.randperm(len(clips), generator=gen).split(c.batch_size):
                wave = torch.stack([self._augment(waves[i], gen) for i in batch.tolist()])
                loss = F.cross_entropy(self.cnn(self._spec_augment(self.features(wave), gen)), labels[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        bar.close()
        self.eval()

    def _augment(self, samples: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        """[n] -> [window]: at a random offset in the window, sometimes with white noise."""
        w, n = self.window_samples, len(samples)
        start = int(torch.randint(w - n + 1, (1,), generator=gen))
        wave = F.pad(torch.from_numpy(samples), (start, w - n - start))
        if float(torch.rand(1, generator=gen)) < self.config.noise_prob:
            snr_db = 10 + 30 * float(torch.rand(1, generator=gen))
            rms = wave.pow(2).mean().sqrt()
            wave = wave + torch.randn(w, generator=gen) * rms * 10 ** (-snr_db / 20)
        return wave

    @staticmethod
    def _spec_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One frequency mask (<= 6 bands) and one time mask (<= 15 frames) per clip, set to the floor (-1)."""
        x = x.clone()
        for item in x:
            f0, f = int(torch.randint(x.shape[2] - 6, (1,), generator=gen)), int(torch.randint(7, (1,), generator=gen))
            t0, t = int(torch.randint(x.shape[3] - 15, (1,), generator=gen)), int(torch.randint(16, (1,), generator=gen))
            item[:, f0: f0 + f] = -1
            item[:, :, t0: t0 + t] = -1
        return x


def fingerprint(clips: list[tuple[Path, int]], config: JudgeConfig) -> str:
    """sha256 (16 hex digits) of the config and every clip's bytes and label."""
    h = hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode())
    for path, digit in clips:
        h.update(f"{digit}:".encode())
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]
