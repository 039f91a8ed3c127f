"""MultimodalConfig: the base LM's config plus the media vocabulary and projectors.

Saved as `config.json` with `model_type: "mllm"`; importing `mllm` registers it
with `AutoConfig`, so HF Auto classes load mllm checkpoints without remote code.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from mllm.vocab import VocabLayout


class MultimodalConfig(PretrainedConfig):
    model_type = "mllm"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config: dict | PretrainedConfig | None = None,
        vocab_layout: dict | None = None,
        projector: str = "mlp2x_gelu",
        **kwargs,
    ):
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        self.text_config = text_config
        self.vocab_layout = vocab_layout or {"text_vocab_size": 0, "modalities": []}
        self.projector = projector
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
