"""Continuous image tokenizer over a pretrained CLIP or SigLIP vision encoder (SEED-X style).

    image -> frozen HF vision tower (hidden state `feature_layer`) [P, H] -> Resampler -> N tokens [N, feature_dim]

`path` is a local directory holding a CLIP or SigLIP checkpoint, full or
vision-only (`config.json`, weights, optionally `preprocessor_config.json`
for the pixel mean and std). Nothing is downloaded and no remote code runs.
It is read once, when the tokenizer is first built: the encoder's HF config
and normalisation are then written into this tokenizer's own config and its
weights into `model.safetensors`, so a saved tokenizer is self-contained.
Only the resampler trains; the encoder stays frozen and in eval mode.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from mllm.config import ConfigError
from mllm.media import Image
from mllm.tokenizers.base import MediaTokenizer, register
from mllm.tokenizers.fsq_image import image_batch
from mllm.tokenizers.resampler_image import Resampler

# model family -> (config class, vision model class, default pixel mean, std, tokens before the patch grid)
FAMILIES = {
    "clip": (CLIPVisionConfig, CLIPVisionModel, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), 1),
    "siglip": (SiglipVisionConfig, SiglipVisionModel, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0),
}
MODEL_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}


@dataclass
class HFVisionConfig:
    path: str = ""  # local CLIP/SigLIP directory, read when first built
    feature_layer: int = -2  # which hidden state (LLaVA reads the penultimate)
    num_tokens: int = 64
    query_grid: bool = True  # queries tile the image (N must be a square); False: free 1D queries
    feature_dim: int = 256  # D of each token
    width: int = 512  # resampler width
    depth: int = 2
    heads: int = 8
    # filled in from `path` on first build; a saved tokenizer is rebuilt from these alone
    encoder: dict[str, Any] | None = None  # the vision tower's HF config
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None

    def __post_init__(self):
        if not self.path and self.encoder is None:
            raise ValueError("set path: a local directory with a CLIP or SigLIP checkpoint")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.num_tokens < 1 or self.feature_dim < 1:
            raise ValueError(f"need num_tokens and feature_dim >= 1, got {self.num_tokens}, {self.feature_dim}")
        if self.query_grid and math.isqrt(self.num_tokens) ** 2 != self.num_tokens:
            raise ValueError(f"query_grid needs a square num_tokens, got {self.num_tokens}")


def _family(model_type: str, key: str, where: str) -> str:
    """The family of a tower's HF `model_type`; a ConfigError on `key` names `where` it came from."""
    if model_type not in MODEL_TYPES:
        raise ConfigError(key, f"{where}: model_type {model_type!r} is not a CLIP or SigLIP vision model "
                               f"({', '.join(MODEL_TYPES)})")
    return MODEL_TYPES[model_type]


def check_layer(encoder: torch.nn.Module, layer: int, key: str) -> None:
    """Refuse a hidden-state index the tower does not have: it has num_hidden_layers + 1 (the embeddings first)."""
    states = encoder.config.num_hidden_layers + 1
    if not -states <= layer < states:
        raise ConfigError(key, f"the tower has {states} hidden states (-{states} to {states - 1}), got {layer}")


def _from_directory(config: HFVisionConfig, key: str = "path") -> tuple[torch.nn.Module, HFVisionConfig]:
    """Load the pretrained tower from `config.path` (the config's `key`); return it and the config with its HF
    config and normalisation."""
    path = Path(config.path)
    if not (path / "config.json").is_file():
        raise ConfigError(key, f"{path}: no config.json; a local CLIP or SigLIP checkpoint directory is needed")
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
        config_cls, model_cls, mean, std, _ = FAMILIES[_family(model_type, key, str(path))]
        encoder = model_cls.from_pretrained(path)
    except (OSError, ValueError) as e:  # transformers' errors for an unreadable config.json or missing weights
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(key, f"{path}: cannot load the checkpoint ({e})") from e
    processor_file = path / "preprocessor_config.json"
    if processor_file.is_file():
        processor = json.loads(processor_file.read_text())
        mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
    resolved = dataclasses.replace(
        config, encoder=encoder.config.to_diff_dict(), image_mean=tuple(mean), image_std=tuple(std)
    )
    return encoder, resolved


@register
class HFVisionTokenizer(MediaTokenizer):
    name = "hf_vision"
    modality = "image"
    kind = "continuous"
    config_class = HFVisionConfig

    def __init__(self, config: HFVisionConfig):
        encoder = None
        if config.encoder is None:
            encoder, config = _from_directory(config)
        config_cls, model_cls, _, _, extra = FAMILIES[_family(config.encoder.get("model_type", ""), "encoder", "hf_vision")]
        if encoder is None:
            encoder = model_cls(config_cls.from_dict(config.encoder))
        check_layer(encoder, config.feature_layer, "feature_layer")
        super().__init__(config)
        self.encoder = encoder.eval().requires_grad_(False)
        e = encoder.config
        grid = e.image_size // e.patch_size
        self.resampler = Resampler(e.hidden_size, config.num_tokens, config.feature_dim, config.width, config.depth,
                                   config.heads, grid if config.query_grid else None, extra + grid**2)
        self.register_buffer("mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> HFVisionTokenizer:
        super().train(mode)
        self.encoder.eval()  # frozen: never in training mode
        return self

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def image_size(self) -> int:
        return self.encoder.config.image_size

    @property
    def layout(self) -> str:
        return "grid" if self.config.query_grid else "sequence"

    def num_tokens(self, media: Image) -> int:
        return self.config.num_tokens

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] in [0, 1] at the encoder's image size -> tokens [B, N, D]."""
        with torch.no_grad():
            hidden = self.encoder(pixel_values=(pixels - self.mean) / self.std, output_hidden_states=True)
            patches = hidden.hidden_states[self.config.feature_layer]  # [B, P, H]
        return self.resampler(patches)

    @torch.no_grad()
    def encode_batch(self, images: list[Image]) -> torch.Tensor:
        """FloatTensor [B, N, D]."""
        return self.features(image_batch(images, self.image_size, self.name))

    def encode(self, media: Image) -> torch.Tensor:
        return self.encode_batch([media])[0]
