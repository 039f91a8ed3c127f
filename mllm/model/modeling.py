"""MultimodalLM: any HF causal LM, with media tokens spliced into its input and output heads on top.

    input_ids [B, T] ──embed──▶ [B, T, H] ──masked_scatter(projector(features))──▶ inputs_embeds
        ──language_model──▶ logits [B, T, V], hidden [B, T, H]
        ──▶ slot_hidden[m] [M, H] ──heads[m]──▶ loss = CE(text + codes) + Σ_m λ_m · head_m.loss
        ──▶ logits at each transcribed input item's slots ──▶ transcript_loss = CTC(transcripts)

Discrete codes are ordinary (added) tokens, so they need nothing beyond the
resized embedding table. Continuous features replace the embedding of their
modality's placeholder token. The hidden state at position p-1 predicts the
feature at placeholder p, as the logits at p-1 predict the token at p.

A modality whose head is `parallel` (Divot-style, SEED-X's output queries)
instead fills its target slots with N learned query embeddings, one per slot
of the item (N = tokens_per_item): they attend to each other within their span
(a 4D mask), and the hidden state at slot p itself predicts the feature at p.
Flash attention cannot take that mask (it reads one as padding, and is always
causal), so such a model refuses it and runs sdpa or eager.
The queries must differ per slot: with one shared placeholder embedding a
small LM gives every slot nearly the same hidden state, so the same feature.

With `transcripts`, the logits at an input item's slots also spell out what is
said in it, by CTC with the modality's placeholder token as the blank. Nothing
reads those logits otherwise (placeholders carry no CE label), and the words
they spell sit at the slots where they are said: a short path for the reply
that writes them down. The training loop weighs the term (`loss.transcripts`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForCausalLM, PreTrainedModel

from mllm.heads import Head, build_head
from mllm.losses import causal_lm_loss, ctc_loss, multimodal_loss
from mllm.model.configuration import MultimodalConfig, head_entry
from mllm.model.projector import PROJECTORS, sees_items
from mllm.vocab import VocabLayout


@dataclass
class MultimodalLMOutput:
    loss: torch.Tensor | None = None  # lm_loss + Σ_m λ_m · head_losses[m]
    logits: torch.Tensor | None = None  # [B, T, V]
    past_key_values: object | None = None  # the LM's KV cache
    lm_loss: torch.Tensor | None = None  # CE over labelled text and code positions
    head_losses: dict[str, torch.Tensor] | None = None  # m -> its head's loss on the target features
    last_hidden_state: torch.Tensor | None = None  # [B, T, H], with output_hidden_states
    slot_hidden: dict[str, torch.Tensor] | None = None  # m -> [M, H], predicts each target feature
    slot_targets: dict[str, torch.Tensor] | None = None  # m -> [M, D], the features to predict
    transcript_loss: torch.Tensor | None = None  # Σ_m CTC of m's transcribed items, with `transcripts`; not in `loss`


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
        if config.text_config is None:
            raise ValueError("MultimodalConfig.text_config is missing: the base LM's config is required")
        parallel = [name for name, spec in config.heads.items() if spec["parallel"]]
        for attn in (config._attn_implementation, config.text_config._attn_implementation):
            refuse_flash_attention(attn, parallel)  # before transformers looks for flash-attn
        super().__init__(config)
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        self.layout = config.layout
        hidden = config.text_config.hidden_size
        continuous = [name for name, m in self.layout.modalities.items() if m.spec.kind == "continuous"]
        names = projector_names(config.projector, continuous)
        self.projectors = nn.ModuleDict(
            {
                name: PROJECTORS.build(names[name], in_dim=self.layout[name].spec.feature_dim, out_dim=hidden)
                for name in continuous
            }
        )
        self.heads = nn.ModuleDict({name: self._build_head(name, spec) for name, spec in config.heads.items()})
        for name, n in config.tokens_per_item.items():
            if name not in self.layout.modalities or n < 0:
                known = sorted(self.layout.modalities)
                raise ValueError(f"tokens_per_item.{name} must be >= 0 and name a modality of {known}")
        unknown = sorted(set(config.transcribed) - set(continuous))
        if unknown:
            raise ValueError(f"transcribed: {unknown} are not continuous modalities of this model ({sorted(continuous)})")
        self.queries = nn.ParameterDict()  # m -> [N, H]: the output query of each slot of a parallel item
        for name, spec in config.heads.items():
            self._set_queries(name, spec)
        # transformers 5 calls the KV cache `cache`, 4.x `past_key_values`.
        params = inspect.signature(self.language_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # Under several ranks every rank must reach every projector and head in the same order, whatever media
        # its micro-batch holds: ZeRO reduces gradients in lockstep (stage 2) and gathers a module's parameters
        # collectively when it runs (stage 3). Multi-rank runners set this; an unneeded module then runs on
        # zeros, times 0: the loss is unchanged and its parameters get a zero gradient instead of none.
        self.touch_idle_modules = False
        self.post_init()
        # Heads bring their own initialisation (MAR zero-initialises its modulations), which the generic one in
        # post_init overwrote. Under from_pretrained, init functions are no-ops and the loaded weights follow.
        for head in self.heads.values():
            head.reset_parameters()

    @classmethod
    def from_base(
        cls,
        base: str | PreTrainedModel,
        layout: VocabLayout,
        *,
        projector: str | dict[str, str] = "mlp2x_gelu",
        heads: dict[str, dict] | None = None,
        tokens_per_item: dict[str, int] | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
    ) -> "MultimodalLM":
        """Wrap a pretrained causal LM (a local directory or a model) and grow its vocabulary by `layout`.

        Rows for the new tokens start at the mean of the text rows, so they
        begin as an average word rather than noise. `projector`, `heads` and
        `tokens_per_item` are as in MultimodalConfig; projectors and heads
        take the LM's device and dtype.
        """
        if isinstance(base, PreTrainedModel):
            lm = base
        else:
            lm = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation=attn_implementation)
        rows = lm.get_input_embeddings().weight.shape[0]
        if layout.text_vocab_size > rows:
            raise ValueError(f"tokenizer has {layout.text_vocab_size} text tokens but the LM only {rows} embeddings")
        config = MultimodalConfig(
            text_config=lm.config,
            vocab_layout=layout.to_dict(),
            projector=projector,
            heads=heads,
            tokens_per_item=tokens_per_item,
        )
        model = cls(config, language_model=lm)
        weight = lm.get_input_embeddings().weight  # projectors and heads were built on the host in fp32
        model.projectors.to(weight.device, weight.dtype)
        model.heads.to(weight.device, weight.dtype)
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

    def _build_head(self, name: str, spec: dict) -> Head:
        modality = self.layout[name].spec
        if modality.kind != "continuous":
            raise ValueError(f"heads.{name}: {name} is discrete; its codes come from the LM head, not an output head")
        given = sorted({"hidden_size", "feature_dim"} & set(spec["options"]))
        if given:
            raise ValueError(f"heads.{name}.options: '{given[0]}' comes from the model, do not set it")
        if not spec["parallel"] and sees_items(self.projectors[name]):
            raise ValueError(
                f"heads.{name} is sequential, but {name}'s projector sees whole items: fed back one feature at a time, "
                f"bidirectional context would show each target to the position predicting it; make the head parallel "
                f"or give {name} a token-wise projector"
            )
        dims = {"hidden_size": self.config.text_config.hidden_size, "feature_dim": modality.feature_dim}
        return build_head(spec["name"], {**spec["options"], **dims})

    def replace_head(self, name: str, spec: dict) -> None:
        """A new, freshly initialised output head for modality `name` (e.g. diffusion in place of GMM), in the
        config too, so that the saved checkpoint rebuilds it."""
        if name not in self.config.heads:
            raise KeyError(f"the model has no head for {name!r} (heads: {sorted(self.config.heads)})")
        spec = head_entry(name, spec)
        if spec["parallel"]:
            refuse_flash_attention(self.language_model.config._attn_implementation, [name])
        weight = self.get_input_embeddings().weight  # the new head lives where and as the model does
        head = self._build_head(name, spec)
        head.reset_parameters()
        self._set_queries(name, spec)  # may refuse the spec too, so before the head and config change
        self.heads[name] = head.to(weight.device, weight.dtype)
        self.config.heads[name] = spec

    def _set_queries(self, name: str, spec: dict) -> None:
        """Learned output queries for a parallel head's N slots (kept when a parallel head replaces another);
        none for a sequential head."""
        if not spec["parallel"]:
            if name in self.queries:
                del self.queries[name]
            return
        n = self.config.tokens_per_item.get(name, 0)
        if n <= 0:
            raise ValueError(f"heads.{name} is parallel: tokens_per_item.{name} must give its N query slots")
        if name not in self.queries:
            weight = self.get_input_embeddings().weight  # drawn on the host, kept where and as the embeddings are
            queries = torch.randn(n, self.config.text_config.hidden_size) * 0.02
            self.queries[name] = nn.Parameter(queries.to(weight.device, weight.dtype))

    def is_parallel(self, name: str) -> bool:
        """Whether modality `name` writes its features Divot-style, a whole span per forward pass."""
        return name in self.config.heads and self.config.heads[name]["parallel"]

    def _init_weights(self, module: nn.Module) -> None:
        # Only projectors and heads reach here; the LM's modules use the LM's own initialiser.
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

    def embed(
        self,
        input_ids: torch.Tensor,
        features: dict[str, torch.Tensor] | None = None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, H] with each continuous placeholder replaced by its projected feature.

        `queries` [B, T] marks placeholder slots that keep their embedding (parallel-mode outputs);
        `features[m]` has one row per other placeholder slot of m, in reading order.
        """
        features = features or {}
        unknown = sorted(set(features) - set(self.projectors))
        if unknown:
            raise ValueError(f"features for '{unknown[0]}', which is not a continuous modality of this model")
        embeds = self.get_input_embeddings()(input_ids)
        slots = {m: input_ids == self.layout[m].placeholder_id for m in self.projectors}  # [B, T] each
        marked = {m: slots[m] & queries for m in self.queries if m in slots} if queries is not None else {}
        if queries is not None:
            slots = {m: s & ~queries for m, s in slots.items()}
        # Every count the checks need, in one device-to-host read (on a GPU each read waits for the device): a text
        # decoding step reads nothing else here. Each projector that runs adds one, its features' NaN check (two when
        # it sees whole items: their lengths), and each modality with query slots one, its longest span.
        sums = [s.sum() for s in slots.values()] + [q.sum() for q in marked.values()]
        counts = torch.stack(sums).tolist() if sums else []
        n_marked = dict(zip(marked, counts[len(slots):]))
        for name in self.queries:
            embeds = self._add_queries(embeds, marked.get(name), n_marked.get(name, 0), name)
        for (name, projector), n_slots in zip(self.projectors.items(), counts):
            spec, feats = self.layout[name].spec, features.get(name)
            n_feats = 0 if feats is None else feats.shape[0]
            if n_slots != n_feats:
                raise ValueError(f"{name}: input_ids has {n_slots} placeholder slots but {n_feats} feature rows")
            if n_slots == 0 and not self.touch_idle_modules:
                continue
            if n_slots == 0:  # one zero row, scattered nowhere: the same graph as real features
                feats = embeds.new_zeros(1, spec.feature_dim)
            if feats.dim() != 2 or feats.shape[1] != spec.feature_dim:
                raise ValueError(f"{name}: features must be [n, {spec.feature_dim}], got {tuple(feats.shape)}")
            if not torch.isfinite(feats).all():
                raise ValueError(f"{name}: features contain NaN or inf")
            feats = feats.to(embeds.dtype)
            if sees_items(projector):  # each run of adjacent slots is one item
                lengths = item_lengths(slots[name]) if n_slots else [1]
                projected = projector(feats, lengths)  # [n, H]
            else:
                projected = projector(feats)  # [n, H]
            # under autocast the projector answers in bf16 while the table's embeddings stay fp32
            embeds = embeds.masked_scatter(slots[name].unsqueeze(-1), projected.to(embeds.dtype))
        return embeds

    def _add_queries(self, embeds: torch.Tensor, marked: torch.Tensor | None, n_marked: int, name: str) -> torch.Tensor:
        """embeds [B, T, H] + queries[name][k] at the k-th slot of each run of `marked` [B, T] (`name`'s spans;
        n_marked: how many slots it marks, counted by the caller)."""
        table = self.queries[name]
        if n_marked == 0:  # idle: a zero-weighted touch keeps multi-rank reduction in step
            return embeds + 0 * table.sum() if self.touch_idle_modules else embeds
        rank = query_ranks(marked)
        if int(rank.max()) >= len(table):
            raise ValueError(f"{name}: a parallel span longer than its {len(table)} query slots (tokens_per_item)")
        # F.embedding, not table[rank]: on a CPU the backward of indexing adds repeated rows with parallel atomic
        # adds, in a varying order, so two runs drift apart; the embedding's backward sums each row in a fixed order
        return embeds + torch.where(marked.unsqueeze(-1), F.embedding(rank, table), 0)

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
        transcripts: dict[str, list[torch.Tensor]] | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> MultimodalLMOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        feature_targets = self.target_flags(input_ids, features, feature_targets)
        queries = self.query_slots(input_ids, feature_targets) if feature_targets else None
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, self.input_features(features, feature_targets), queries)
        if queries is not None:
            if past_key_values is not None:
                raise ValueError("parallel-mode feature targets need the whole sequence, without past_key_values")
            documents = None if position_ids is None else (position_ids == 0).cumsum(-1)  # packed ones restart at 0
            if attention_mask is not None and attention_mask.dim() == 4:  # packed rows: documents already separate
                if documents is None:                                      # them, the padding tail included
                    raise ValueError("a 4D attention_mask with parallel-mode targets needs the packed position_ids")
                padding = torch.ones_like(input_ids)
            else:
                padding = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            blocks, length = query_blocks(queries), input_ids.shape[1]
            attention_mask = block_causal_mask(padding, blocks, length, inputs_embeds.dtype, documents)
        if attention_mask is not None and attention_mask.dim() == 4:  # queries' blocks (also generate's) or packed rows
            refuse_flash_attention(self.language_model.config._attn_implementation, list(self.queries))
        out, hidden = self._run_language_model(
            output_hidden_states or bool(feature_targets) or self.touch_idle_modules,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **{self._cache_arg: past_key_values},
            **kwargs,
        )
        slot_hidden, slot_targets = {}, {}
        for name, is_target in feature_targets.items():
            slots = (input_ids == self.layout[name].placeholder_id).nonzero()  # [n, 2], reading order
            rows, cols = slots[is_target].unbind(-1)
            if not self.is_parallel(name):
                if (cols == 0).any():
                    raise ValueError(f"{name}: a target slot at position 0 has no preceding hidden state")
                cols = cols - 1
            slot_hidden[name] = hidden[rows, cols]  # [M, H]
            slot_targets[name] = features[name][is_target]  # [M, D]
        head_losses, idle = {}, {}
        for m, head in self.heads.items():  # a fixed order, the same on every rank
            if m in slot_hidden:
                head_losses[m] = head.loss(slot_hidden[m], slot_targets[m])
            elif self.touch_idle_modules:  # the first hidden state against a zero target, weighted 0 below
                zero_target = inputs_embeds.new_zeros(1, self.layout[m].spec.feature_dim)
                idle[m] = head.loss(hidden[0, :1], zero_target)
        lm_loss = causal_lm_loss(out.logits, labels) if labels is not None else None
        transcript_loss = self.transcript_loss(input_ids, out.logits, transcripts) if transcripts else None
        weights = {m: self.config.heads[m]["loss_weight"] for m in head_losses} | dict.fromkeys(idle, 0.0)
        return MultimodalLMOutput(
            loss=multimodal_loss(lm_loss, head_losses | idle, weights),
            logits=out.logits,
            past_key_values=getattr(out, self._cache_arg),
            lm_loss=lm_loss,
            head_losses=head_losses,
            last_hidden_state=hidden if output_hidden_states else None,
            slot_hidden=slot_hidden,
            slot_targets=slot_targets,
            transcript_loss=transcript_loss,
        )

    def _run_language_model(self, need_hidden: bool, **inputs) -> tuple[object, torch.Tensor | None]:
        """The LM's output and, with `need_hidden`, its last hidden state [B, T, H], caught as its decoder returns
        it: output_hidden_states would also keep the other L layers' [B, T, H] (for a 7B model's 4k-token prefill
        of 8 rows, 9 GB in bf16) for none to read them."""
        if not need_hidden:
            return self.language_model(**inputs, output_hidden_states=False), None
        decoder, caught = self.language_model.get_decoder(), []
        hook = decoder.register_forward_hook(lambda module, args, output: caught.append(output[0]))
        try:
            out = self.language_model(**inputs, output_hidden_states=False)
        finally:
            hook.remove()
        if len(caught) != 1:
            raise RuntimeError(f"{type(decoder).__name__}, the LM's decoder, ran {len(caught)} times in one forward pass")
        return out, caught[0]

    def transcript_loss(
        self, input_ids: torch.Tensor | None, logits: torch.Tensor, transcripts: dict[str, list[torch.Tensor]]
    ) -> torch.Tensor | None:
        """Σ over modalities of the CTC of their items' slot logits against the items' transcripts.

        input_ids [B, T], logits [B, T, V]; transcripts[m]: one id tensor [S_i] per item of m (runs of
        adjacent placeholder slots, reading order), empty for an item without one. None when all are empty.
        """
        if input_ids is None or logits.shape[1] != input_ids.shape[1]:
            raise ValueError("transcripts need input_ids and the logits of every position (logits_to_keep=0)")
        losses = []
        for name, texts in transcripts.items():
            if name not in self.projectors:
                raise ValueError(f"transcripts for '{name}', which is not a continuous modality of this model")
            slots = input_ids == self.layout[name].placeholder_id  # [B, T]
            lengths = item_lengths(slots)
            if len(texts) != len(lengths):
                raise ValueError(f"{name}: {len(texts)} transcripts for {len(lengths)} items")
            said = [(x, t) for x, t in zip(logits[slots].split(lengths), texts) if t.numel()]  # ([L_i, V], [S_i])
            if said:
                items, targets = zip(*said)
                losses.append(ctc_loss(
                    pad_sequence(items, batch_first=True),  # [N, L_max, V]
                    torch.tensor([len(x) for x in items]),
                    torch.cat(targets).to(logits.device),
                    torch.tensor([len(t) for t in targets]),
                    blank=self.layout[name].placeholder_id,
                ))
        return torch.stack(losses).sum() if losses else None

    def target_flags(
        self,
        input_ids: torch.Tensor | None,
        features: dict[str, torch.Tensor] | None,
        feature_targets: dict[str, torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        """The entries of `feature_targets` that mark any target, each checked before the LM runs: a bool [n] per
        modality, one flag per placeholder slot of input_ids [B, T] (reading order) and per feature row."""
        feature_targets = feature_targets or {}
        for name, flags in feature_targets.items():
            if name not in self.projectors:
                raise ValueError(f"feature_targets for '{name}', which is not a continuous modality of this model")
            if flags.dtype != torch.bool or flags.dim() != 1:  # 0/1 integers would pick rows 0 and 1, not mark them
                raise ValueError(f"{name}: feature_targets must be a 1-D bool mask, got {flags.dtype} {tuple(flags.shape)}")
        if not feature_targets or input_ids is None:
            if any(flags.any() for flags in feature_targets.values()):
                raise ValueError("feature_targets need input_ids to locate their slots")
            return {}
        # one device-to-host read: each modality's slot count, then whether it marks any target
        reads = [(input_ids == self.layout[m].placeholder_id).sum() for m in feature_targets]
        reads += [flags.any().to(input_ids.device, torch.long) for flags in feature_targets.values()]
        counts = torch.stack(reads).tolist()
        marking = {}
        for (name, flags), n_slots, marks in zip(feature_targets.items(), counts, counts[len(feature_targets) :]):
            if flags.shape[0] != n_slots:
                raise ValueError(f"{name}: {flags.shape[0]} target flags for {n_slots} placeholder slots")
            n_feats = features[name].shape[0] if features and name in features else 0
            if marks and n_feats != n_slots:
                raise ValueError(f"{name}: {flags.shape[0]} target flags for {n_feats} feature rows")
            if marks:
                marking[name] = flags
        return marking

    def query_slots(self, input_ids: torch.Tensor, feature_targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """[B, T] bool: the target slots of parallel-mode modalities, or None when there are none."""
        queries = None
        for name, is_target in feature_targets.items():
            if self.is_parallel(name):
                slots = input_ids == self.layout[name].placeholder_id
                marked = torch.zeros_like(slots)
                marked[slots] = is_target.to(slots.device)  # boolean indexing fills in reading order
                queries = marked if queries is None else queries | marked
        return queries

    def input_features(
        self, features: dict[str, torch.Tensor] | None, feature_targets: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The features that enter as inputs: all of them, less the targets of parallel-mode modalities."""
        return {
            m: f[~feature_targets[m]] if self.is_parallel(m) and m in feature_targets else f
            for m, f in (features or {}).items()
        }


def refuse_flash_attention(attn_implementation: str | None, parallel: list[str]) -> None:
    """Raise when a flash attention would serve the parallel heads of `parallel`: their queries need a 4D
    block-causal mask [B, 1, T, T], which transformers' flash path reads as a [B, T] padding mask, and flash
    attention is always causal."""
    if parallel and attn_implementation is not None and "flash" in attn_implementation:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} cannot serve the parallel head of {', '.join(parallel)}: "
            "its queries need a 4D block-causal attention mask, which flash attention cannot take; use 'sdpa' or "
            "'eager' ('auto' picks sdpa for a model with a parallel head)"
        )


def projector_names(projector: str | dict[str, str], continuous: list[str]) -> dict[str, str]:
    """Each continuous modality's projector name: one name for all, or one per modality, every one named."""
    if isinstance(projector, str):
        return dict.fromkeys(continuous, projector)
    missing, extra = sorted(set(continuous) - set(projector)), sorted(set(projector) - set(continuous))
    if missing or extra:
        raise ValueError(
            f"projector: name one per continuous modality {sorted(continuous)}; "
            + (f"missing {missing}" if missing else f"{extra} are not continuous modalities of this model")
        )
    return dict(projector)


def item_lengths(slots: torch.Tensor) -> list[int]:
    """[B, T] bool -> the length of every run of adjacent slots (one media item each), in reading order."""
    item = _run_starts(slots).flatten().long().cumsum(0)[slots.flatten()]  # [n]: 1, 1, ..., 2, ...
    return torch.bincount(item)[1:].tolist()


def _run_starts(marked: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the first position of every run of adjacent marked ones (query slots, or an item's slots)."""
    return marked & ~nn.functional.pad(marked, (1, 0))[:, :-1]


def query_blocks(queries: torch.Tensor) -> torch.Tensor:
    """[B, T] bool -> [B, T] long: each run of adjacent queries numbered 1, 2, ... per row; 0 elsewhere."""
    return _run_starts(queries).long().cumsum(-1) * queries


def query_ranks(queries: torch.Tensor) -> torch.Tensor:
    """[B, T] bool -> [B, T] long: each query's place in its run, 0, 1, ...; 0 elsewhere."""
    index = torch.arange(queries.shape[1], device=queries.device).expand_as(queries)
    return (index - torch.where(_run_starts(queries), index, 0).cummax(-1).values) * queries


def block_causal_mask(
    padding: torch.Tensor,
    blocks: torch.Tensor,
    query_len: int,
    dtype: torch.dtype,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """An additive attention mask [B, 1, Q, K] for the last `query_len` of K positions.

    padding [B, K] (1 = real), blocks [B, K] (0 = none). A query sees the real
    keys at or before it, and every key of its own block (bidirectional
    within a block); with `documents` [B, K], only keys of its own document.
    """
    k = padding.shape[1]
    key = torch.arange(k, device=padding.device)
    allowed = key[None, None, :] <= key[k - query_len :, None]  # [1, Q, K] causal
    own_block = blocks[:, k - query_len :, None]  # [B, Q, 1]
    allowed = allowed | ((own_block == blocks[:, None, :]) & (own_block > 0))  # [B, Q, K]
    if documents is not None:
        allowed = allowed & (documents[:, k - query_len :, None] == documents[:, None, :])
    allowed = allowed & padding[:, None, :].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=padding.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
