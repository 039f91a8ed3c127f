"""MultimodalConfig: the base LM's config plus the media vocabulary, projectors and output heads.

Saved as `config.json` with `model_type: "mllm"`; importing `mllm` registers it
with `AutoConfig`, so HF Auto classes load mllm checkpoints without remote code.

    projector = "mlp2x_gelu"   or one per continuous modality: {"image": "mlp2x_gelu", "audio": "context_gru"}
    heads = {"image": {"name": "gmm", "options": {"num_components": 16}, "loss_weight": 1.0, "parallel": False}}
    tokens_per_item = {"image": 64, "audio": 0}
    transcribed = ["audio"]

`heads` attaches an output head (`mllm.heads`, by registry name) to a
continuous modality; the head's `hidden_size` and `feature_dim` come from the
LM and the vocabulary. `loss_weight` is λ in CE + λ·head loss. `parallel`
selects Divot-style outputs: the span's N placeholders are queries that attend
to each other, and the hidden state at each slot (not before it) predicts its
feature, so a whole item comes from one forward pass.

`tokens_per_item` is N, the number of tokens the model writes per media item:
generation forces the end token after N codes or features. It belongs to the
trained model (it learned to write N), so it travels with the checkpoint. A
discrete modality with 0 ends its span when the model writes the end token;
a continuous one needs N > 0 to be generated.

`transcribed` names the continuous modalities whose slots were trained to
spell the item's transcript (a CTC term on the LM's logits there, the
placeholder id as the blank; the training loop records it). Transcription
can then read the slots too (joint CTC/attention decoding, `Pipeline.transcribe`).
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from mllm.vocab import VocabLayout

HEAD_KEYS = {"name", "options", "loss_weight", "parallel"}


class MultimodalConfig(PretrainedConfig):
    model_type = "mllm"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config: dict | PretrainedConfig | None = None,
        vocab_layout: dict | None = None,
        projector: str | dict[str, str] = "mlp2x_gelu",
        heads: dict[str, dict] | None = None,
        tokens_per_item: dict[str, int] | None = None,
        transcribed: list[str] | None = None,
        **kwargs,
    ):
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        self.text_config = text_config
        self.vocab_layout = vocab_layout or {"text_vocab_size": 0, "modalities": []}
        self.projector = projector if isinstance(projector, str) else dict(projector)
        self.heads = {name: head_entry(name, spec) for name, spec in (heads or {}).items()}
        self.tokens_per_item = {name: int(n) for name, n in (tokens_per_item or {}).items()}
        self.transcribed = sorted(transcribed or [])
        # Tying follows the base LM: its own config decides, and the wrapper only reports it.
        kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        # Setting the wrapper's attention implementation also sets the LM's; default to what the LM has.
        kwargs.setdefault("attn_implementation", getattr(text_config, "_attn_implementation", None))
        super().__init__(**kwargs)

    @property
    def layout(self) -> VocabLayout:
        return VocabLayout.from_dict(self.vocab_layout)

    def get_text_config(self, *args, **kwargs) -> PretrainedConfig:
        return self.text_config


def head_entry(modality: str, spec: dict) -> dict:
    """A head entry with every key spelled out, so config.json says exactly what was built."""
    unknown = sorted(set(spec) - HEAD_KEYS)
    if unknown or "name" not in spec:
        raise ValueError(f"heads.{modality}: expected keys {sorted(HEAD_KEYS)} with a 'name', got {sorted(spec)}")
    return {
        "name": spec["name"],
        "options": dict(spec.get("options") or {}),
        "loss_weight": float(spec.get("loss_weight", 1.0)),
        "parallel": bool(spec.get("parallel", False)),
    }
