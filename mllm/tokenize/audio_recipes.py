"""Recipes for the audio tokenizers: `audio_codec` (discrete) and `audio_mel_diffusion` (continuous).

Both train on random crops of the train split of the built-in speech and
sound corpora (`data.corpora`), never on the eval-only `spoken_numbers`.

- `audio_codec` trains the codec's encoder+quantizer (the media tokenizer) and
  its decoder (the de-tokenizer) as one `CodecPair`, with a multi-resolution
  STFT loss plus a log-mel L1 loss, then saves the halves apart.
- `audio_mel_diffusion` trains in two stages: first the mel autoencoder (the
  tokenizer's encoder and the de-tokenizer's coarse decoder), then, with both
  frozen, the de-tokenizer's diffusion model, conditioned on the latents and
  the coarse mel, with the latents of silence as the unconditional branch.

Evaluation (`mllm tokenize eval`) reconstructs the test split's single-digit
utterances (held-out voices) and sound effects, and reports:

    judge_accuracy_original / _reconstruction   the spoken-digit judge (trained on original audio only)
    mel_distance_db                              mean |log-mel(original) - log-mel(reconstruction)|, in dB
    tokens_per_second
    transcript_probe_cer                         (mel latents) CER of a linear CTC probe on the latents: do they say
                                                 what is spoken, not only how it sounds (mllm/tokenize/transcripts.py)

It writes `report/NN_<what>_{original,reconstruction}.wav` and
`report/spectrograms.png` (each original above its reconstruction).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mllm.detokenizers import DeTokenizer, load_detokenizer
from mllm.detokenizers.audio_codec import CodecDecoder
from mllm.detokenizers.diffusion_mel import MelDiffusionConfig, MelDiffusionDecoder
from mllm.errors import InputError
from mllm.judges.spoken_digits import SpokenDigitJudge, single_digit_clips
from mllm.losses import ctc_loss
from mllm.media import Audio, load_audio, save_audio
from mllm.plots import save_loss_curves, save_spectrograms
from mllm.tokenize.corpus_media import corpus_media
from mllm.tokenize.recipes import RECIPE_FILE, Recipe, load_recipe, register_recipe
from mllm.tokenize.trainer import OptimConfig, fit
from mllm.tokenize.transcripts import NUM_CLASSES, linear_ctc_probe_cer, transcribed_clips, transcript_batches
from mllm.tokenizers import MediaTokenizer, load_media_tokenizer
from mllm.tokenizers.audio_codec import CodecConfig, CodecTokenizer
from mllm.tokenizers.mel_latent import LogMel, MelConfig, MelLatentTokenizer

TRAIN_CORPORA = ("speech", "sounds")  # spoken_numbers is eval-only: never trained or tuned on


@dataclass
class AudioData:
    corpora: list[str] = field(default_factory=lambda: list(TRAIN_CORPORA))
    crop_seconds: float = 1.0  # rounded down to whole tokens
    max_clips: int | None = None  # cap on train clips per corpus (None: all)

    def __post_init__(self):
        bad = [c for c in self.corpora if c not in TRAIN_CORPORA]
        if bad or not self.corpora:
            raise ValueError(f"audio recipes train on {list(TRAIN_CORPORA)} only, got {self.corpora}")
        if self.crop_seconds <= 0:
            raise ValueError(f"crop_seconds must be positive, got {self.crop_seconds}")
        if self.max_clips is not None and self.max_clips < 1:  # a slice [:-1] would drop the last clip
            raise ValueError(f"max_clips must be >= 1 (or null: all), got {self.max_clips}")


# ---------------------------------------------------------------- data


def audio_paths(corpora_dir: Path, corpus: str, split: str) -> list[Path]:
    """Every audio file the records of corpus/split.jsonl name, each once, in record order."""
    return list(corpus_media(corpora_dir, corpus, split, "audio"))


def load_train_clips(corpora_dir: Path, data: AudioData, sample_rate: int) -> list[torch.Tensor]:
    """Mono waveforms [N] at sample_rate of the train split of each corpus in data.corpora."""
    paths = [p for c in data.corpora for p in audio_paths(corpora_dir, c, "train")[: data.max_clips]]
    if not paths:
        raise InputError(f"{corpora_dir}: the train splits of {', '.join(data.corpora)} name no audio files")
    return [torch.from_numpy(load_audio(p, sample_rate=sample_rate).samples[0]) for p in tqdm(paths, desc="load audio")]


def random_crops(clips: list[torch.Tensor], batch_size: int, length: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches [B, length] of random crops; shorter clips are padded with silence at a random offset."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        batch = []
        for i in torch.randint(len(clips), (batch_size,), generator=gen).tolist():
            clip = clips[i]
            shift = int(torch.randint(abs(len(clip) - length) + 1, (1,), generator=gen))
            if len(clip) >= length:
                batch.append(clip[shift: shift + length])
            else:
                batch.append(F.pad(clip, (shift, length - len(clip) - shift)))
        yield torch.stack(batch)


def crop_length(data: AudioData, sample_rate: int, samples_per_token: int) -> int:
    return max(1, int(data.crop_seconds * sample_rate) // samples_per_token) * samples_per_token


# ---------------------------------------------------------------- the codec


class MultiResolutionSTFTLoss(nn.Module):
    """Spectral convergence + L1 of log magnitudes, averaged over STFT resolutions (Parallel WaveGAN).

    Magnitudes are floored at `floor` before the log: espeak's digital silence would otherwise
    dominate the log term with errors far below anything audible.
    """

    def __init__(self, resolutions: list[tuple[int, int]], floor: float):
        super().__init__()
        self.resolutions = resolutions
        self.floor = floor
        for n_fft, _ in resolutions:
            self.register_buffer(f"window_{n_fft}", torch.hann_window(n_fft), persistent=False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred, target [B, N] -> scalar."""
        total = 0.0
        for n_fft, hop in self.resolutions:
            window = getattr(self, f"window_{n_fft}")
            p, t = (torch.stft(x, n_fft, hop, window=window, pad_mode="constant", return_complex=True).abs()
                    for x in (pred, target))
            p, t = p.clamp(min=self.floor), t.clamp(min=self.floor)
            convergence = torch.linalg.norm(t - p, dim=(1, 2)) / torch.linalg.norm(t, dim=(1, 2)).clamp(min=1e-7)
            total = total + convergence.mean() + F.l1_loss(p.log(), t.log())
        return total / len(self.resolutions)


@dataclass
class CodecLoss:
    stft_resolutions: list[tuple[int, int]] = field(
        default_factory=lambda: [(512, 128), (1024, 256), (2048, 512)])  # (n_fft, hop)
    floor: float = 1e-3  # STFT magnitudes are clamped to it before the log (about 50 dB below quiet speech)
    mel_weight: float = 2.0  # log-mel L1 (the codec's own mel, normalised) next to the STFT loss

    def __post_init__(self):
        if not self.stft_resolutions or any(len(r) != 2 or not 0 < r[1] <= r[0] for r in self.stft_resolutions):
            raise ValueError(f"stft_resolutions must be one or more (n_fft, hop) with 0 < hop <= n_fft, "
                             f"got {self.stft_resolutions}")
        if self.floor <= 0 or self.mel_weight < 0:  # a zero floor takes the log of digital silence: -inf
            raise ValueError(f"need floor > 0 and mel_weight >= 0, got {self.floor}, {self.mel_weight}")


class CodecPair(nn.Module):
    """Encoder+quantizer and decoder, trained together through FSQ's straight-through rounding."""

    def __init__(self, config: CodecConfig, loss: CodecLoss):
        super().__init__()
        self.tokenizer = CodecTokenizer(config)
        self.detokenizer = CodecDecoder(config)
        self.stft_loss = MultiResolutionSTFTLoss(loss.stft_resolutions, loss.floor)
        self.mel_weight = loss.mel_weight

    def training_losses(self, wave: torch.Tensor) -> dict[str, torch.Tensor]:
        """wave [B, N], N a multiple of samples_per_token."""
        vectors, _ = self.tokenizer.quantize(wave)
        recon = self.detokenizer(vectors)
        stft = self.stft_loss(recon, wave)
        mel = F.l1_loss(self.tokenizer.mel(recon), self.tokenizer.mel(wave))
        return {"loss": stft + self.mel_weight * mel, "stft": stft, "mel": mel}


@dataclass
class AudioCodecRecipe:
    model: CodecConfig = field(default_factory=CodecConfig)
    loss: CodecLoss = field(default_factory=CodecLoss)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=2000, batch_size=16, lr=1e-3))
    data: AudioData = field(default_factory=AudioData)


def train_codec(cfg: AudioCodecRecipe, corpora_dir: Path, out: Path) -> dict:
    start = time.time()
    torch.manual_seed(cfg.optim.seed)
    pair = CodecPair(cfg.model, cfg.loss)
    m = cfg.model
    clips = load_train_clips(corpora_dir, cfg.data, m.mel.sample_rate)
    length = crop_length(cfg.data, m.mel.sample_rate, m.samples_per_token)
    history = fit(pair, random_crops(clips, cfg.optim.batch_size, length, cfg.optim.seed), cfg.optim, desc="audio codec")
    pair.tokenizer.save_pretrained(out / "media_tokenizer")
    pair.detokenizer.save_pretrained(out / "detokenizer")
    save_loss_curves(history, out / "loss.png", title="audio codec")
    return {
        "train_clips": len(clips), "steps": cfg.optim.steps, "train_seconds": round(time.time() - start, 1),
        "tokens_per_second": m.token_rate, "codebook_size": m.codebook_size,
        "parameters": sum(p.numel() for p in pair.parameters()),
        **{f"final_{k}": float(np.mean(v[-50:])) for k, v in history.items()},
    }


def evaluate_codec(trained: Path, corpora_dir: Path, report: Path, limit: int | None, split: str) -> dict:
    tokenizer, detokenizer = load_media_tokenizer(trained / "media_tokenizer"), load_detokenizer(trained / "detokenizer")
    return evaluate_audio(tokenizer, detokenizer, corpora_dir, report, limit, split)


register_recipe(Recipe("audio_codec", AudioCodecRecipe, train_codec, evaluate_codec))


# ---------------------------------------------------------------- mel latents + diffusion


class MelAutoencoder(nn.Module):
    """The tokenizer's encoder and the de-tokenizer's coarse decoder, trained as one β-VAE on log-mels; with
    `ctc_weight` > 0, a throwaway linear layer also reads the transcript's characters from the latent means."""

    def __init__(self, tokenizer: MelLatentTokenizer, detokenizer: MelDiffusionDecoder, kl_weight: float,
                 ctc_weight: float = 0.0):
        super().__init__()
        self.tokenizer, self.decoder, self.kl_weight, self.ctc_weight = tokenizer, detokenizer.coarse, kl_weight, ctc_weight
        self.ctc = nn.Linear(tokenizer.config.latent_dim, NUM_CLASSES) if ctc_weight > 0 else None

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch["wave"] [B, N] -> L1 mel reconstruction + kl_weight · KL(posterior || N(0, I)),
        + ctc_weight · CTC on batch["speech"] (whole transcribed clips) when given."""
        mel = self.tokenizer.mel_frames(batch["wave"])
        mean, logvar = self.tokenizer.posterior(mel)
        latents = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        recon = F.l1_loss(self.decoder(latents), mel)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        losses = {"loss": recon + self.kl_weight * kl, "recon": recon, "kl": kl}
        if "speech" in batch:
            speech = batch["speech"]
            means, _ = self.tokenizer.posterior(self.tokenizer.mel_frames(speech.inputs))  # [B, D, T]
            frames = speech.frames(self.tokenizer.config.samples_per_token)
            losses["ctc"] = ctc_loss(self.ctc(means.transpose(1, 2)), frames, speech.targets, speech.target_lengths)
            losses["loss"] = losses["loss"] + self.ctc_weight * losses["ctc"]
        return losses


@dataclass
class AudioMelDiffusionRecipe:
    model: MelDiffusionConfig = field(default_factory=MelDiffusionConfig)  # model.latents: the tokenizer
    kl_weight: float = 1e-3
    autoencoder: OptimConfig = field(default_factory=lambda: OptimConfig(steps=1000, batch_size=16, lr=1e-3))
    diffusion: OptimConfig = field(default_factory=lambda: OptimConfig(steps=1500, batch_size=16, lr=1e-3))
    data: AudioData = field(default_factory=AudioData)
    transcripts: float = 0.0  # weight of a CTC loss reading the speech transcripts from the latents (0: none)
    transcript_batch: int = 16  # whole transcribed clips per autoencoder step
    guidance: float | None = None  # for `mllm tokenize eval` (None: the de-tokenizer's own, model.guidance)
    steps: int | None = None  # sampling steps for eval (None: the de-tokenizer's default)

    def __post_init__(self):
        if self.transcripts < 0 or self.transcript_batch < 1:
            raise ValueError(f"need transcripts >= 0 and transcript_batch >= 1, got {self.transcripts}, {self.transcript_batch}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        # checked here, not when `mllm tokenize eval` first decodes: after the whole training
        if (self.steps is not None and self.steps < 1) or (self.guidance is not None and self.guidance < 0):
            raise ValueError(f"need steps >= 1 and guidance >= 0 (or null: the de-tokenizer's own), got {self.steps}, "
                             f"{self.guidance}")


def null_latent(tokenizer: MelLatentTokenizer) -> torch.Tensor:
    """The latent of silence [D]: a middle frame of one second of digital silence (edges see padding)."""
    rate = tokenizer.config.mel.sample_rate
    latents = tokenizer.encode(Audio(np.zeros((1, rate), np.float32), rate))
    return latents[len(latents) // 2]


def train_mel_diffusion(cfg: AudioMelDiffusionRecipe, corpora_dir: Path, out: Path) -> dict:
    start = time.time()
    torch.manual_seed(cfg.autoencoder.seed)
    lat = cfg.model.latents
    tokenizer, detokenizer = MelLatentTokenizer(lat), MelDiffusionDecoder(cfg.model)
    clips = load_train_clips(corpora_dir, cfg.data, lat.mel.sample_rate)
    length = crop_length(cfg.data, lat.mel.sample_rate, lat.samples_per_token)

    autoencoder = MelAutoencoder(tokenizer, detokenizer, cfg.kl_weight, cfg.transcripts)
    crops = ({"wave": w} for w in random_crops(clips, cfg.autoencoder.batch_size, length, cfg.autoencoder.seed))
    if cfg.transcripts > 0:
        speech = transcript_batches(transcribed_clips(corpora_dir, "train", lat.mel.sample_rate), cfg.transcript_batch,
                                    cfg.autoencoder.seed)
        crops = (c | {"speech": s} for c, s in zip(crops, speech))
    ae_history = fit(autoencoder, crops, cfg.autoencoder, desc="mel autoencoder")
    autoencoder.requires_grad_(False)  # the encoder and the coarse decoder stay as they are from here on
    ae_seconds = time.time() - start

    def conditioned(waves: Iterator[torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        for wave in waves:
            with torch.no_grad():  # not around the yield: that would switch gradients off in the trainer too
                mel = tokenizer.mel_frames(wave)
                latents = tokenizer.posterior(mel)[0]
            yield {"mel": mel, "latents": latents}

    batches = conditioned(random_crops(clips, cfg.diffusion.batch_size, length, cfg.diffusion.seed))
    with torch.no_grad():
        detokenizer.null_latent.copy_(null_latent(tokenizer))
        detokenizer.residual_std.fill_(torch.stack([(b["mel"] - detokenizer.coarse(b["latents"])).std()
                                                    for b in itertools.islice(batches, 8)]).mean())
    diff_history = fit(detokenizer, batches, cfg.diffusion, desc="mel diffusion")
    tokenizer.save_pretrained(out / "media_tokenizer")
    detokenizer.save_pretrained(out / "detokenizer")
    curves = {"autoencoder L1": ae_history["recon"], "diffusion MSE": diff_history["loss"]}
    if "ctc" in ae_history:
        curves["autoencoder CTC"] = ae_history["ctc"]
    save_loss_curves(curves, out / "loss.png", title="mel autoencoder, then diffusion")
    sample = torch.cat([tokenizer.encode(Audio(c[None].numpy(), lat.mel.sample_rate)) for c in clips[:200]])
    return {
        "train_clips": len(clips), "autoencoder_steps": cfg.autoencoder.steps, "diffusion_steps": cfg.diffusion.steps,
        "autoencoder_seconds": round(ae_seconds, 1), "train_seconds": round(time.time() - start, 1),
        "tokens_per_second": lat.token_rate, "feature_dim": lat.latent_dim,
        "latent_mean": float(sample.mean()), "latent_std": float(sample.std()),
        "tokenizer_parameters": sum(p.numel() for p in tokenizer.parameters()),
        "detokenizer_parameters": sum(p.numel() for p in detokenizer.parameters()),
        "residual_std": float(detokenizer.residual_std),
        "final_autoencoder_recon": float(np.mean(ae_history["recon"][-50:])),
        **({"final_autoencoder_ctc": float(np.mean(ae_history["ctc"][-50:]))} if "ctc" in ae_history else {}),
        "final_diffusion_loss": float(np.mean(diff_history["loss"][-50:])),
    }


def evaluate_mel_diffusion(trained: Path, corpora_dir: Path, report: Path, limit: int | None, split: str) -> dict:
    _, cfg = load_recipe(trained / RECIPE_FILE)
    tokenizer, detokenizer = load_media_tokenizer(trained / "media_tokenizer"), load_detokenizer(trained / "detokenizer")
    metrics = evaluate_audio(tokenizer, detokenizer, corpora_dir, report, limit, split, guidance=cfg.guidance,
                             steps=cfg.steps)
    return metrics | {"transcript_probe_cer": round(transcript_probe(tokenizer, corpora_dir, split, limit), 4)}


def transcript_probe(tokenizer: MelLatentTokenizer, corpora_dir: Path, split: str, limit: int | None,
                     train_clips: int = 2000) -> float:
    """How plainly the latents say what is spoken: the CER of a linear CTC probe on them, fit on (up to
    `train_clips`) train utterances, read on the split's (held-out voices)."""
    rate = tokenizer.config.mel.sample_rate

    def encoded(clips):
        with torch.no_grad():
            return [(tokenizer.encode(Audio(w[None].numpy(), rate)), text) for w, text in clips]

    train = encoded(transcribed_clips(corpora_dir, "train", rate, limit=train_clips))
    return linear_ctc_probe_cer(train, encoded(transcribed_clips(corpora_dir, split, rate, limit=limit)))


register_recipe(Recipe("audio_mel_diffusion", AudioMelDiffusionRecipe, train_mel_diffusion, evaluate_mel_diffusion))


# ---------------------------------------------------------------- evaluation


def mel_distance_db(original: Audio, reconstruction: Audio, mel: LogMel) -> float:
    """Mean |Δ| of 20·log10 mel magnitudes over the common frames; both floored 80 dB below the original's peak."""
    rate = mel.cfg.sample_rate
    a, b = (torch.from_numpy(x.to_mono().resample(rate).samples[0]) for x in (original, reconstruction))
    ma, mb = (20 * mel.magnitude(x[None])[0].clamp(min=1e-10).log10() for x in (a, b))
    frames = min(ma.shape[-1], mb.shape[-1])
    floor = ma.max() - 80
    return float((ma[:, :frames].clamp(min=floor) - mb[:, :frames].clamp(min=floor)).abs().mean())


def evaluate_audio(tokenizer: MediaTokenizer, detokenizer: DeTokenizer, corpora_dir: Path, report: Path,
                   limit: int | None, split: str, guidance: float | None = None, steps: int | None = None,
                   examples: int = 4) -> dict:
    """Round-trip the split's single-digit utterances and sound effects; write WAVs, spectrograms, metrics."""
    judge = SpokenDigitJudge.load_or_train(corpora_dir)
    digits = single_digit_clips(corpora_dir, split)[:limit]
    sounds = audio_paths(corpora_dir, "sounds", split)[:limit]
    mel = LogMel(MelConfig())
    generator = torch.Generator().manual_seed(0)
    report.mkdir(parents=True, exist_ok=True)
    results: dict[str, list] = {"digit": [], "sound": []}
    tokens = seconds = 0.0
    with torch.no_grad():
        for kind, paths in (("digit", [p for p, _ in digits]), ("sound", sounds)):
            for path in tqdm(paths, desc=f"round-trip {kind}s"):
                original = load_audio(path)
                codes = tokenizer.encode(original)
                recon = detokenizer.decode(codes, guidance=guidance, steps=steps, generator=generator)
                tokens, seconds = tokens + len(codes), seconds + original.duration
                results[kind].append((original, recon, mel_distance_db(original, recon, mel)))
    shown = [("digit", *r) for r in results["digit"][:examples]]
    shown += [("sound", *r) for r in results["sound"][: examples // 2]]
    titles = []
    for k, (what, original, recon, _) in enumerate(shown):
        save_audio(original, report / f"{k:02d}_{what}_original.wav")
        save_audio(recon, report / f"{k:02d}_{what}_reconstruction.wav")
        titles += [f"{k:02d} {what}: original", f"{k:02d} {what}: reconstruction"]
    if shown:
        save_spectrograms([clip for _, o, r, _ in shown for clip in (o, r)], report / "spectrograms.png", titles)
    labels = [d for _, d in digits]
    return {
        "digit_clips": len(digits), "sound_clips": len(sounds),
        "judge_accuracy_original": judge.accuracy([o for o, _, _ in results["digit"]], labels),
        "judge_accuracy_reconstruction": judge.accuracy([r for _, r, _ in results["digit"]], labels),
        "mel_distance_db": float(np.mean([d for _, _, d in results["digit"]])) if digits else float("nan"),
        "mel_distance_db_sounds": float(np.mean([d for _, _, d in results["sound"]])) if sounds else float("nan"),
        "tokens_per_second": tokens / seconds if seconds else float("nan"),
        "guidance": detokenizer.resolve_guidance(guidance), "steps": steps,
    }
