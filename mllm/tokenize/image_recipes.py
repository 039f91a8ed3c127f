"""Image tokenizer recipes: train a tokenizer with its de-tokenizer, then evaluate the pair.

    image_fsq        fsq_image (2D grid of FSQ codes)       + vq_image decoder    trained jointly: MSE
    image_query      query_image (1D causal VQ codes)       + vq_image decoder    trained jointly: MSE + commitment
    image_diffusion  resampler_image | hf_vision (features) + diffusion_image     1. tokens through a throwaway
                                                                                    ViT pixel decoder: MSE
                                                                                    (+ the words of the image's
                                                                                    captions from the mean token)
                                                                                 2. de-tokenizer on the frozen
                                                                                    tokens: diffusion loss

Training reads the distinct images of the train split of `data.corpora`
(built corpora, `mllm data build`), a shuffled batch at a time, and writes
media_tokenizer/, detokenizer/, loss.png and metrics. Evaluation
reconstructs the test split (encode, then decode) and reports PSNR, the
digit judge's accuracy on the originals and on the reconstructions (digits
corpus), codebook utilisation (discrete), and `reconstructions.png`:
originals above their reconstructions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mllm.augment import AffineJitter, jitter
from mllm.config import from_dict
from mllm.detokenizers.base import load_detokenizer
from mllm.detokenizers.diffusion import DiffusionConfig
from mllm.detokenizers.diffusion_image import DiffusionImageConfig, DiffusionImageDeTokenizer, DiTArch, UNetArch
from mllm.detokenizers.vq_image import PixelDecoder, PixelDecoderArch, VQImageDecoder, VQImageDecoderConfig
from mllm.judges import DigitJudge, digit_images
from mllm.media import Image, load_image
from mllm.plots import save_image_grid
from mllm.tokenize.captions import CaptionReader, CaptionVocabulary, CaptionWords, captioned_batches
from mllm.tokenize.corpus_media import corpus_media, evenly_spaced, shuffled_batches
from mllm.tokenize.metrics import codebook_usage, psnr_db
from mllm.tokenize.recipes import RECIPE_FILE, Recipe, load_recipe, register_recipe
from mllm.tokenize.trainer import EvalConfig, OptimConfig, fit, training_metrics
from mllm.tokenizers import hf_vision, resampler_image  # noqa: F401  (register the continuous tokenizers)
from mllm.tokenizers.base import MEDIA_TOKENIZERS, MediaTokenizer, build_media_tokenizer, load_media_tokenizer
from mllm.tokenizers.fsq_image import FSQImageConfig, FSQImageTokenizer, image_batch
from mllm.tokenizers.query_image import QueryImageConfig, QueryImageTokenizer

GRID_COLUMNS = 10


# ---------------------------------------------------------------- configs


@dataclass
class ImageData:
    corpora: list[str] = field(default_factory=lambda: ["digits"])  # names under --data, or absolute directories
    max_images: int | None = None  # cap on distinct training images (None: all)
    cache_images: int = 20_000  # decoded images kept in memory after their first load


@dataclass
class FSQRecipeConfig:
    tokenizer: FSQImageConfig = field(default_factory=FSQImageConfig)
    decoder: PixelDecoderArch = field(default_factory=PixelDecoderArch)
    data: ImageData = field(default_factory=ImageData)
    optim: OptimConfig = field(default_factory=OptimConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class QueryRecipeConfig:
    tokenizer: QueryImageConfig = field(default_factory=QueryImageConfig)
    decoder: PixelDecoderArch = field(default_factory=PixelDecoderArch)
    data: ImageData = field(default_factory=ImageData)
    optim: OptimConfig = field(default_factory=OptimConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class TokenizerSpec:
    """A continuous image tokenizer by registry name, with its config's options (validated here)."""

    name: str = "resampler_image"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        cls = MEDIA_TOKENIZERS.get(self.name)
        if cls.modality != "image" or cls.kind != "continuous":
            raise ValueError(f"tokenizer {self.name!r} is a {cls.kind} {cls.modality} tokenizer; need a continuous image one")
        from_dict(cls.config_class, self.options, _key="tokenizer.options")


@dataclass
class TokenPretraining(CaptionWords):
    """Stage 1 of image_diffusion: tokens learn to keep what the pixels need, through a throwaway ViT decoder (MSE).

    With `caption_words` > 0 the mean token must also predict the words of the image's training captions
    (bag of words, VirTex-style text supervision; SEED's tokenizer learns from captions contrastively): pixel tokens
    alone keep strokes, not which digit they draw, and an LM must then learn vision itself to read them.
    """

    decoder: PixelDecoderArch = field(default_factory=PixelDecoderArch)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AffineJitter = field(default_factory=AffineJitter)  # on the images the tokens encode and reconstruct


@dataclass
class DiffusionRecipeConfig:
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    pretraining: TokenPretraining = field(default_factory=TokenPretraining)
    image_size: int = 32  # the de-tokenizer's output size
    backbone: Literal["dit", "unet"] = "dit"
    dit: DiTArch = field(default_factory=DiTArch)
    unet: UNetArch = field(default_factory=UNetArch)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: ImageData = field(default_factory=ImageData)
    optim: OptimConfig = field(default_factory=OptimConfig)  # stage 2: the de-tokenizer on the frozen tokens
    evaluation: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------- data


def corpus_images(corpora_dir: Path, corpus: str, split: str) -> list[Path]:
    """The distinct image files a corpus' split refers to, in record order."""
    return list(corpus_media(corpora_dir, corpus, split, "image"))


def train_images(corpora_dir: Path, data: ImageData) -> list[Path]:
    paths = [p for corpus in data.corpora for p in corpus_images(corpora_dir, corpus, "train")]
    if not paths:
        raise ValueError(f"no training images in {data.corpora} under {corpora_dir}")
    return paths[: data.max_images]


def image_batches(paths: list[Path], batch_size: int, seed: int, cache_images: int) -> Iterator[list[Image]]:
    """Endless shuffled epochs of `batch_size` images; the first `cache_images` distinct ones stay decoded in memory."""
    return shuffled_batches(paths, batch_size, seed, cache_images, load_image)


@dataclass
class EvalSet:
    images: list[Image]
    labels: list[int | None]  # the digit, for images of the digits corpus


def eval_set(corpora_dir: Path, data: ImageData, limit: int | None, split: str) -> EvalSet:
    images, labels = [], []
    for corpus in data.corpora:
        if corpus == "digits":
            paths, digits = digit_images(corpora_dir, split)
        else:
            paths = corpus_images(corpora_dir, corpus, split)
            digits = [None] * len(paths)
        images += [load_image(p) for p in paths]
        labels += digits
    keep = evenly_spaced(len(images), limit)
    images, labels = [images[i] for i in keep], [labels[i] for i in keep]
    return EvalSet(images, labels)


# ---------------------------------------------------------------- joint training modules


class DiscreteAutoencoder(nn.Module):
    """A discrete tokenizer and its direct decoder, trained as one autoencoder."""

    def __init__(self, tokenizer: MediaTokenizer, decoder: VQImageDecoder):
        super().__init__()
        self.tokenizer, self.decoder = tokenizer, decoder

    def training_losses(self, images: list[Image]) -> dict[str, torch.Tensor]:
        pixels = image_batch(images, self.tokenizer.image_size, "train")  # [B, 3, S, S]
        vectors, _, aux = self.tokenizer.quantize(pixels)
        mse = F.mse_loss(self.decoder.decode_vectors(vectors), pixels)
        return {"loss": mse + aux, "mse": mse}  # aux: the VQ commitment loss (FSQ has none)


class TokenAutoencoder(nn.Module):
    """Stage 1 of image_diffusion: a continuous tokenizer and a throwaway pixel decoder, trained on MSE; with a
    vocabulary, also a throwaway linear reader of caption words from the mean token."""

    def __init__(self, tokenizer: MediaTokenizer, decoder: PixelDecoder, augment: AffineJitter, vocabulary: int = 0,
                 words_weight: float = 0.0):
        super().__init__()
        self.tokenizer, self.decoder, self.augment = tokenizer, decoder, augment
        self.captions = CaptionReader(tokenizer.feature_dim, vocabulary, words_weight)

    def training_losses(self, batch: tuple[list[Image], torch.Tensor | None]) -> dict[str, torch.Tensor]:
        images, words = batch  # words: [B, V] caption word targets, or None
        pixels = jitter(image_batch(images, self.tokenizer.image_size, "train"), self.augment)  # [B, 3, S, S]
        tokens = self.tokenizer.features(pixels)  # [B, N, D]
        return self.captions.add_loss({"mse": F.mse_loss(self.decoder(tokens), pixels)}, tokens, words)


class TokenConditionedDiffusion(nn.Module):
    """Stage 2 of image_diffusion: the diffusion de-tokenizer learns to decode the frozen tokenizer's tokens."""

    def __init__(self, tokenizer: MediaTokenizer, detokenizer: DiffusionImageDeTokenizer):
        super().__init__()
        self.tokenizer, self.detokenizer = tokenizer, detokenizer

    def training_losses(self, images: list[Image]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            tokens = self.tokenizer.features(image_batch(images, self.tokenizer.image_size, "train"))  # [B, N, D]
        return self.detokenizer.training_losses(image_batch(images, self.detokenizer.config.image_size, "train"), tokens)


def empty_image(size: int) -> Image:
    return Image(np.zeros((size, size, 3), dtype=np.uint8))


# ---------------------------------------------------------------- train


def build_discrete(tokenizer_cls: type, cfg: FSQRecipeConfig | QueryRecipeConfig) -> tuple[MediaTokenizer, VQImageDecoder]:
    """A fresh discrete tokenizer and the direct decoder that reads its codes."""
    tokenizer = tokenizer_cls(cfg.tokenizer)
    decoder = VQImageDecoder(
        VQImageDecoderConfig(
            image_size=tokenizer.image_size,
            num_tokens=tokenizer.tokens_per_image,
            codebook_size=tokenizer.codebook_size,
            code_dim=tokenizer.code_dim,
            layout=tokenizer.layout,
            arch=cfg.decoder,
        )
    )
    return tokenizer, decoder


def train_discrete(tokenizer_cls: type, cfg: FSQRecipeConfig | QueryRecipeConfig, corpora: Path, out: Path) -> dict:
    torch.manual_seed(cfg.optim.seed)
    tokenizer, decoder = build_discrete(tokenizer_cls, cfg)
    batches = image_batches(train_images(corpora, cfg.data), cfg.optim.batch_size, cfg.optim.seed, cfg.data.cache_images)
    clock = (time.perf_counter(), time.process_time())
    history = fit(DiscreteAutoencoder(tokenizer, decoder), batches, cfg.optim, desc=tokenizer.name)
    decoder.set_codebook(tokenizer.codebook)
    tokenizer.eval().save_pretrained(out / "media_tokenizer")
    decoder.eval().save_pretrained(out / "detokenizer")
    return training_metrics(out, history, len(history["loss"]), clock, {"tokenizer": tokenizer, "decoder": decoder},
                   tokenizer.name)


def build_diffusion(cfg: DiffusionRecipeConfig) -> tuple[MediaTokenizer, DiffusionImageDeTokenizer]:
    """A fresh continuous tokenizer and the diffusion de-tokenizer conditioned on its tokens."""
    tokenizer = build_media_tokenizer(cfg.tokenizer.name, cfg.tokenizer.options)
    detokenizer = DiffusionImageDeTokenizer(
        DiffusionImageConfig(
            image_size=cfg.image_size,
            num_tokens=tokenizer.num_tokens(empty_image(tokenizer.image_size)),
            token_dim=tokenizer.feature_dim,
            layout=tokenizer.layout,
            backbone=cfg.backbone,
            dit=cfg.dit,
            unet=cfg.unet,
            diffusion=cfg.diffusion,
        )
    )
    return tokenizer, detokenizer


def train_diffusion(cfg: DiffusionRecipeConfig, corpora: Path, out: Path) -> dict:
    """Two stages, as SEED-X does with its pretrained ViT: first the tokens, then a de-tokenizer conditioned on them."""
    torch.manual_seed(cfg.optim.seed)
    tokenizer, detokenizer = build_diffusion(cfg)
    probe = PixelDecoder(tokenizer.image_size, detokenizer.config.num_tokens, tokenizer.feature_dim, tokenizer.layout,
                         cfg.pretraining.decoder)
    paths, pre = train_images(corpora, cfg.data), cfg.pretraining.optim
    clock = (time.perf_counter(), time.process_time())
    if cfg.pretraining.caption_words > 0:
        vocabulary = CaptionVocabulary(corpora, cfg.data.corpora, "image", cfg.pretraining.min_word_count)
        batches = captioned_batches(paths, vocabulary, pre.batch_size, pre.seed, cfg.data.cache_images, load_image)
        stage1_module = TokenAutoencoder(tokenizer, probe, cfg.pretraining.augment, len(vocabulary.words),
                                         cfg.pretraining.caption_words)
    else:
        batches = ((images, None) for images in image_batches(paths, pre.batch_size, pre.seed, cfg.data.cache_images))
        stage1_module = TokenAutoencoder(tokenizer, probe, cfg.pretraining.augment)
    stage1 = fit(stage1_module, batches, pre, desc="image_diffusion tokens")
    tokenizer.eval().requires_grad_(False)
    detokenizer.set_null_tokens(tokenizer.encode(empty_image(tokenizer.image_size)))
    batches = image_batches(paths, cfg.optim.batch_size, cfg.optim.seed, cfg.data.cache_images)
    stage2 = fit(TokenConditionedDiffusion(tokenizer, detokenizer), batches, cfg.optim,
                 desc="image_diffusion de-tokenizer", parameters=list(detokenizer.parameters()))
    tokenizer.save_pretrained(out / "media_tokenizer")
    detokenizer.eval().save_pretrained(out / "detokenizer")
    history = {f"tokens_{k}": v for k, v in stage1.items() if k != "loss"} | {"diffusion": stage2["loss"]}
    return training_metrics(out, history, len(stage1.get("loss", [])) + len(stage2["loss"]), clock,  # stage 1 may have 0 steps
                   {"tokenizer": tokenizer, "detokenizer": detokenizer}, "image_diffusion")


# ---------------------------------------------------------------- evaluate


def psnr(original: Image, reconstruction: Image) -> float:
    """dB, pixels in [0, 1], at the reconstruction's size."""
    return psnr_db(original.resize((reconstruction.height, reconstruction.width)).to_tensor(), reconstruction.to_tensor())


def reconstruction_report(test: EvalSet, recons: list[Image], judge: DigitJudge | None, report: Path) -> dict:
    """PSNR, the judge's accuracy on originals and reconstructions, and the picture."""
    metrics: dict[str, Any] = {
        "images": len(recons),
        "psnr_db": round(float(np.mean([psnr(o, r) for o, r in zip(test.images, recons)])), 2),
    }
    digits = [i for i, label in enumerate(test.labels) if label is not None]
    if judge is not None and digits:
        labels = [test.labels[i] for i in digits]
        metrics["judge_accuracy_originals"] = round(judge.accuracy([test.images[i] for i in digits], labels), 4)
        metrics["judge_accuracy_reconstructions"] = round(judge.accuracy([recons[i] for i in digits], labels), 4)
    shown = _grid_indices(test.labels)
    rows = []
    for start in range(0, len(shown), GRID_COLUMNS):
        block = shown[start:start + GRID_COLUMNS]
        rows += [[test.images[i] for i in block], [recons[i] for i in block]]
    titles = ["original", "reconstruction"] * (len(rows) // 2)
    save_image_grid(rows, report / "reconstructions.png", row_titles=titles)
    return metrics


def _grid_indices(labels: list[int | None]) -> list[int]:
    """Two of each digit when the labels allow it (0-9 twice), else the first 20 items."""
    by_digit = [[i for i, label in enumerate(labels) if label == d][:2] for d in range(10)]
    if all(len(b) == 2 for b in by_digit):
        return [b[0] for b in by_digit] + [b[1] for b in by_digit]
    return list(range(min(2 * GRID_COLUMNS, len(labels))))


def _judge(corpora: Path, data: ImageData) -> DigitJudge | None:
    return DigitJudge.load_or_train(corpora) if "digits" in data.corpora else None


def evaluate_discrete(trained: Path, corpora: Path, report: Path, limit: int | None, split: str) -> dict:
    _, cfg = load_recipe(trained / RECIPE_FILE)
    tokenizer, decoder = load_media_tokenizer(trained / "media_tokenizer"), load_detokenizer(trained / "detokenizer")
    test, judge = eval_set(corpora, cfg.data, limit, split), _judge(corpora, cfg.data)
    codes, recons = [], []
    start = time.perf_counter()
    for i in tqdm(range(0, len(test.images), cfg.evaluation.batch_size), desc="reconstruct"):
        batch = tokenizer.encode_batch(test.images[i:i + cfg.evaluation.batch_size])  # [B, N]
        codes.append(batch)
        recons += decoder.decode_batch(batch)
    seconds = time.perf_counter() - start
    return {
        **reconstruction_report(test, recons, judge, report),
        "tokens_per_image": tokenizer.tokens_per_image,
        "codebook_size": tokenizer.codebook_size,
        **codebook_usage(codes, tokenizer.codebook_size),
        "reconstruct_items_per_s": round(len(recons) / seconds, 1),
    }


@torch.no_grad()
def mean_tokens(tokenizer: MediaTokenizer, images: list[Image], batch_size: int) -> torch.Tensor:
    """images -> their mean tokens [B, D], encoded in batches."""
    return torch.cat([tokenizer.encode_batch(images[i:i + batch_size]).mean(1) for i in range(0, len(images), batch_size)])


def digit_reader(tokenizer: MediaTokenizer, corpora: Path, batch_size: int, steps: int = 300) -> Callable[[torch.Tensor], torch.Tensor]:
    """A linear reader of the digit, fit on the standardised mean tokens of every train digit (full-batch Adam,
    seeded): mean tokens [M, D] of this tokenizer -> digits [M]."""
    paths, labels = digit_images(corpora, "train")
    x, y = mean_tokens(tokenizer, [load_image(p) for p in tqdm(paths, desc="probe: train digits")], batch_size), torch.tensor(labels)
    torch.manual_seed(0)
    mean, std = x.mean(0), x.std(0) + 1e-6
    linear = nn.Linear(x.shape[1], 10)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(linear((x - mean) / std), y).backward()
        optimizer.step()
    return lambda tokens: linear((tokens - mean) / std).argmax(1)


def mean_token_probe(tokenizer: MediaTokenizer, corpora: Path, test: EvalSet, batch_size: int, steps: int = 300) -> float:
    """How plainly the tokens say which digit: `digit_reader`'s accuracy on the test digits of `test`."""
    read = digit_reader(tokenizer, corpora, batch_size, steps)
    digits = [i for i, label in enumerate(test.labels) if label is not None]
    x_test, y_test = mean_tokens(tokenizer, [test.images[i] for i in digits], batch_size), torch.tensor([test.labels[i] for i in digits])
    return float((read(x_test) == y_test).float().mean())


def evaluate_diffusion(trained: Path, corpora: Path, report: Path, limit: int | None, split: str) -> dict:
    _, cfg = load_recipe(trained / RECIPE_FILE)
    tokenizer, detokenizer = load_media_tokenizer(trained / "media_tokenizer"), load_detokenizer(trained / "detokenizer")
    test, judge = eval_set(corpora, cfg.data, limit, split), _judge(corpora, cfg.data)
    e = cfg.evaluation
    generator = torch.Generator().manual_seed(e.seed)
    recons = []
    start = time.perf_counter()
    for i in tqdm(range(0, len(test.images), e.batch_size), desc="reconstruct"):
        tokens = tokenizer.encode_batch(test.images[i:i + e.batch_size])  # [B, N, D]
        recons += detokenizer.decode_batch(tokens, guidance=e.guidance, steps=e.steps, generator=generator)
    seconds = time.perf_counter() - start
    probe = {} if judge is None else {"mean_token_probe_accuracy": round(mean_token_probe(tokenizer, corpora, test, e.batch_size), 4)}
    return {
        **reconstruction_report(test, recons, judge, report),
        **probe,
        "tokens_per_image": tokenizer.num_tokens(test.images[0]),
        "token_dim": tokenizer.feature_dim,
        "guidance": detokenizer.resolve_guidance(e.guidance),
        "steps": e.steps or detokenizer.config.diffusion.steps,
        "scheduler": detokenizer.config.diffusion.scheduler,
        "reconstruct_items_per_s": round(len(recons) / seconds, 2),
    }


register_recipe(Recipe("image_fsq", FSQRecipeConfig, partial(train_discrete, FSQImageTokenizer), evaluate_discrete))
register_recipe(Recipe("image_query", QueryRecipeConfig, partial(train_discrete, QueryImageTokenizer), evaluate_discrete))
register_recipe(Recipe("image_diffusion", DiffusionRecipeConfig, train_diffusion, evaluate_diffusion))
