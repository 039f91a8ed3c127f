"""MultimodalLM: any HF causal LM, with media tokens spliced into its input.

    input_ids [B, T] ──embed──▶ [B, T, H] ──masked_scatter(projector(features))──▶ inputs_embeds
        ──language_model──▶ logits [B, T, V], hidden [B, T, H]
        ──▶ loss = CE(text + discrete codes); slot_hidden[m] [M, H] for the continuous heads

Discrete codes are ordinary (added) tokens, so they need nothing beyond the
resized embedding table. Continuous features replace the embedding of their
modality's placeholder token. The hidden state at position p-1 predicts the
feature at placeholder p, as the logits at p-1 predict the token at p.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from mllm.losses import causal_lm_loss
from mllm.model.configuration import MultimodalConfig
from mllm.model.projector import PROJECTORS
from mllm.vocab import VocabLayout


@dataclass
class MultimodalLMOutput:
    loss: torch.Tensor | None = None  # CE over labelled text and code positions
    logits: torch.Tensor | None = None  # [B, T, V]
    past_key_values: object | None = None  # the LM's KV cache
    slot_hidden: dict[str, torch.Tensor] | None = None  # m -> [M, H], predicts each target feature
    slot_targets: dict[str, torch.Tensor] | None = None  # m -> [M, D], the features to predict


class MultimodalLM(PreTrainedModel):
    config_class = MultimodalConfig
    base_model_prefix = "mllm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True  # transformers 5
    _supports_flash_attn_2 = True  # transformers 4
    _supports_flex_attn = True

    def __init__(self, config: MultimodalConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        if config.text_config is None:
            raise ValueError("MultimodalConfig.text_config is missing: the base LM's config is required")
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        self.layout = config.layout
        hidden = config.text_config.hidden_size
        self.projectors = nn.ModuleDict(
            {
                name: PROJECTORS.build(config.projector, in_dim=m.spec.feature_dim, out_dim=hidden)
                for name, m in self.layout.modalities.items()
                if m.spec.kind == "continuous"
            }
        )
        # transformers 5 calls the KV cache `cache`, 4.x `past_key_values`.
        params = inspect.signature(self.language_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.post_init()

    @classmethod
    def from_base(
        cls,
        base: str | PreTrainedModel,
        layout: VocabLayout,
        *,
        projector: str = "mlp2x_gelu",
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
    ) -> "MultimodalLM":
        """Wrap a pretrained causal LM (a local directory or a model) and grow its vocabulary by `layout`.

        Rows for the new tokens start at the mean of the text rows, so they
        begin as an average word rather than noise.
        """
        if isinstance(base, PreTrainedModel):
            lm = base
        else:
            lm = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation=attn_implementation)
        rows = lm.get_input_embeddings().weight.shape[0]
        if layout.text_vocab_size > rows:
            raise ValueError(f"tokenizer has {layout.text_vocab_size} text tokens but the LM only {rows} embeddings")
        config = MultimodalConfig(text_config=lm.config, vocab_layout=layout.to_dict(), projector=projector)
        model = cls(config, language_model=lm)
        # Grow the vocabulary only now: rows created before `post_init` would be re-initialised by it.
        lm.resize_token_embeddings(max(rows, layout.vocab_size), mean_resizing=False)
        new = torch.arange(layout.text_vocab_size, layout.vocab_size)
        with torch.no_grad():
            tables = [lm.get_input_embeddings()]
            if lm.get_output_embeddings() is not None and not lm.config.tie_word_embeddings:
                tables.append(lm.get_output_embeddings())
            for table in tables:
                table.weight[new] = table.weight[: layout.text_vocab_size].mean(0).to(table.weight.dtype)
                if getattr(table, "bias", None) is not None:
                    table.bias[new] = table.bias[: layout.text_vocab_size].mean()
        return model

    def _init_weights(self, module: nn.Module) -> None:
        # Only the projectors reach here; the LM's modules use the LM's own initialiser.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def embed(self, input_ids: torch.Tensor, features: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings [B, T, H] with each continuous placeholder replaced by its projected feature."""
        features = features or {}
        unknown = sorted(set(features) - set(self.projectors))
        if unknown:
            raise ValueError(f"features for '{unknown[0]}', which is not a continuous modality of this model")
        embeds = self.get_input_embeddings()(input_ids)
        for name, projector in self.projectors.items():
            spec, slots = self.layout[name].spec, input_ids == self.layout[name].placeholder_id  # [B, T]
            feats = features.get(name)
            n_slots, n_feats = int(slots.sum()), 0 if feats is None else feats.shape[0]
            if n_slots != n_feats:
                raise ValueError(f"{name}: input_ids has {n_slots} placeholder slots but {n_feats} feature rows")
            if n_slots == 0:
                continue
            if feats.dim() != 2 or feats.shape[1] != spec.feature_dim:
                raise ValueError(f"{name}: features must be [n, {spec.feature_dim}], got {tuple(feats.shape)}")
            if not torch.isfinite(feats).all():
                raise ValueError(f"{name}: features contain NaN or inf")
            projected = projector(feats.to(embeds.dtype))  # [n, H]
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), projected)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: object | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        features: dict[str, torch.Tensor] | None = None,
        feature_targets: dict[str, torch.Tensor] | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MultimodalLMOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, features)
        feature_targets = {m: t for m, t in (feature_targets or {}).items() if t.any()}
        if feature_targets and input_ids is None:
            raise ValueError("feature_targets need input_ids to locate their slots")
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            output_hidden_states=bool(feature_targets),
            return_dict=True,
            **{self._cache_arg: past_key_values},
            **kwargs,
        )
        slot_hidden, slot_targets = {}, {}
        for name, is_target in feature_targets.items():
            slots = (input_ids == self.layout[name].placeholder_id).nonzero()  # [n, 2], reading order
            if is_target.shape[0] != slots.shape[0]:
                raise ValueError(f"{name}: {is_target.shape[0]} target flags for {slots.shape[0]} placeholder slots")
            rows, cols = slots[is_target].unbind(-1)
            if (cols == 0).any():
                raise ValueError(f"{name}: a target slot at position 0 has no preceding hidden state")
            slot_hidden[name] = out.hidden_states[-1][rows, cols - 1]  # [M, H]
            slot_targets[name] = features[name][is_target]  # [M, D]
        return MultimodalLMOutput(
            loss=causal_lm_loss(out.logits, labels) if labels is not None else None,
            logits=out.logits,
            past_key_values=getattr(out, self._cache_arg),
            slot_hidden=slot_hidden,
            slot_targets=slot_targets,
        )
