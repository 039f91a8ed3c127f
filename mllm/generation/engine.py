"""Interleaved generation: text, discrete code spans and continuous feature spans in one KV-cached loop.

Each step every row feeds one position (a parallel span: N positions), all rows in one forward pass:

    text      sample from the text logits; a begin token <m> opens m's span
    codes     sample from m's code range; after N codes </m> is forced
    features  head_m.sample(hidden state) -> feature -> projector -> the next input embedding
    parallel  N placeholder queries in one pass, bidirectional among themselves; head_m.sample on
              their N hidden states gives the whole item, then </m> is forced

Every input goes through the KV cache like a token. Rows of a step that feeds
N queries put their single token last, after N - 1 masked pads, so the last
position always holds each row's newest input.

Classifier-free guidance runs an unconditional stream beside the
conditional one: the batch is [cond rows; uncond rows], both streams are fed
the same chosen tokens and features, and the scales for text, codes and
heads are separate. With every scale at 1 the unconditional stream is not
run at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from mllm.generation.config import GenerationConfig, TokenSampling
from mllm.generation.output import Generation, MediaSpan
from mllm.generation.sampling import choose_tokens, guided_logits
from mllm.generation.spans import SpanRule, SpanRules
from mllm.model import MultimodalLM
from mllm.model.modeling import block_causal_mask, query_blocks, refuse_flash_attention
from mllm.sequence import MultimodalBatch

TextCallback = Callable[[int, str], None]  # (row, new text)
MediaCallback = Callable[[int, MediaSpan], None]  # (row, completed item)


@torch.no_grad()
def generate(
    model: MultimodalLM,
    batch: MultimodalBatch,
    config: GenerationConfig | None = None,
    *,
    uncond: MultimodalBatch | None = None,
    decode_text: Callable[[list[int]], str] | None = None,
    on_text: TextCallback | None = None,
    on_media: MediaCallback | None = None,
) -> list[Generation]:
    """Continue each (left-padded) prompt of `batch`.

    `uncond` holds the unconditional prompts, one per row, for guidance
    (see docs/generation.md: the same chat frame with the user's content
    left out). `decode_text` turns text ids into a string; stop strings and
    `on_text` need it. `on_text(row, delta)` receives new text as it is
    written, `on_media(row, span)` each media item once complete.
    """
    config = config or GenerationConfig()
    for name, prompts in (("prompts", batch), ("uncond", uncond)):
        if prompts is not None and prompts.attention_mask[:, -1].eq(0).any():
            raise ValueError(f"{name} must be left-padded: the last column is padding in some row")
    if config.guided and uncond is None:
        raise ValueError("a cfg_scale other than 1 needs the unconditional prompts: pass uncond=")
    if uncond is not None and uncond.input_ids.shape[0] != batch.input_ids.shape[0]:
        raise ValueError(f"uncond has {uncond.input_ids.shape[0]} rows for {batch.input_ids.shape[0]} prompts")
    if (config.stop_strings or on_text) and decode_text is None:
        raise ValueError("stop_strings and on_text need decode_text to read the generated text")
    engine = _Engine(model, config, decode_text, on_text, on_media)
    return engine.run(batch, uncond if config.guided else None)


def greedy_generate(
    model: MultimodalLM, batch: MultimodalBatch, *, max_new_tokens: int, eos_token_id: int | None
) -> list[list[int]]:
    """Greedy continuation ids of each prompt row, without the eos: `generate` with its defaults."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
    return [g.ids for g in generate(model, batch, config)]


@dataclass
class _Row:
    """What one prompt has generated so far."""

    ids: list[int] = field(default_factory=list)
    segments: list[list[int] | MediaSpan] = field(default_factory=list)
    span: SpanRule | None = None  # the open media span
    body: list = field(default_factory=list)  # its codes (int) or features [D] so far
    awaiting: bool = False  # parallel span: queries fed, their hidden states give the features
    finish: str | None = None
    emitted: int = 0  # characters of the current text run already streamed


@dataclass
class _Feed:
    """What one row puts into the next forward pass."""

    token: int
    feature: torch.Tensor | None = None  # [D], for a continuous placeholder
    queries: int = 0  # N placeholder queries of a parallel span (then `token` is the placeholder)


class _Engine:
    def __init__(self, model, config: GenerationConfig, decode_text, on_text, on_media):
        self.model, self.config = model, config
        self.decode_text, self.on_text, self.on_media = decode_text, on_text, on_media
        eos = config.eos_token_id
        self.pad = config.pad_token_id if config.pad_token_id is not None else (eos if eos is not None else 0)
        self.ends = {eos, *config.stop_token_ids} - {None}

    # ---- the loop ---------------------------------------------------------------------------

    def run(self, batch: MultimodalBatch, uncond: MultimodalBatch | None) -> list[Generation]:
        self.batch_size, self.guided = batch.input_ids.shape[0], uncond is not None
        device = batch.input_ids.device
        self.generator = None if self.config.seed is None else torch.Generator(device).manual_seed(self.config.seed)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        for name, ids in (("pad_token_id", [self.pad]), ("eos_token_id and stop_token_ids", sorted(self.ends))):
            if any(i >= vocab for i in ids):  # a pad past the table failed in the embedding, an eos never matched
                raise ValueError(f"{name} {ids} must be ids of the model's {vocab}-token vocabulary")
        self.rules = SpanRules(self.model, vocab, device, self.config.writes)
        parallel = [rule.modality for rule in self.rules.continuous if rule.parallel]
        refuse_flash_attention(self.model.language_model.config._attn_implementation, parallel)  # before the prefill
        self.need_hidden = bool(self.rules.continuous)  # only heads read hidden states
        self.rows = [_Row() for _ in range(self.batch_size)]
        for r, row in enumerate(self.rows):
            self._open_prompt_span(row, r, batch)
        self.seen = self._seen(batch)
        logits, hidden = self._prefill(batch if uncond is None else _stack(batch, uncond, self.pad))
        while True:
            feeds = self._choose(logits, hidden)
            if all(row.finish for row in self.rows):
                break
            logits, hidden = self._forward(feeds)
        return [Generation(row.ids, row.segments, row.finish) for row in self.rows]

    def _prefill(self, inputs: MultimodalBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        model, ids, mask = self.model, inputs.input_ids, inputs.attention_mask
        targets = model.target_flags(ids, inputs.features, inputs.feature_targets)
        queries = model.query_slots(ids, targets) if targets else None
        self.blocks = query_blocks(queries) if queries is not None else torch.zeros_like(ids)
        embeds = model.embed(ids, model.input_features(inputs.features, targets), queries)
        self.mask, self.positions = mask, (mask.cumsum(-1) - 1).clamp(min=0)
        self.next_block = int(self.blocks.max()) + 1  # block ids stay unique, prompt's included
        self.embeds = None if self.config.use_cache else embeds  # the whole input, to recompute without a cache
        self.past = None
        self.any_queries = queries is not None
        return self._run_model(embeds, self.positions, 1, self.any_queries)

    def _forward(self, feeds: list[_Feed]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append each row's feed (to both streams) and run the model on the new positions.

        A row's inputs are right-aligned in the step's `width` columns, behind masked pads.
        """
        width = max(f.queries or 1 for f in feeds)
        ids, mask, offsets, blocks = [], [], [], []
        features: dict[str, list[torch.Tensor]] = {}
        for r, feed in enumerate(feeds):
            n, pads = feed.queries or 1, width - (feed.queries or 1)
            ids.append([self.pad] * pads + [feed.token] * n)
            mask.append([0] * pads + [1] * n)
            offsets.append([0] * pads + list(range(n)))  # the row's positions continue after its last one
            blocks.append([0] * pads + [self.next_block if feed.queries else 0] * n)
            self.next_block += bool(feed.queries)
            if feed.feature is not None:  # the row's span is open: it names the modality
                features.setdefault(self.rows[r].span.modality, []).append(feed.feature)
        streams, device = 2 if self.guided else 1, self.mask.device
        # one host-to-device copy for the four: [4, R, width] -> each [streams * R, width]
        ids, mask, offsets, blocks = torch.tensor([ids, mask, offsets, blocks], device=device).repeat(1, streams, 1)
        queries = any(f.queries for f in feeds)
        self.any_queries |= queries
        positions = self.positions[:, -1:] + 1 + offsets
        feats = {m: torch.stack(f).repeat(streams, 1) for m, f in features.items()}  # reading order: cond, then uncond
        embeds = self.model.embed(ids, feats, blocks > 0)
        self.mask = torch.cat([self.mask, mask], dim=1)
        self.blocks = torch.cat([self.blocks, blocks], dim=1)
        self.positions = torch.cat([self.positions, positions], dim=1)
        if self.config.use_cache:
            return self._run_model(embeds, positions, width, queries)
        self.embeds = torch.cat([self.embeds, embeds], dim=1)
        return self._run_model(self.embeds, self.positions, width, self.any_queries)

    def _run_model(self, embeds: torch.Tensor, positions: torch.Tensor, width: int, queries: bool):
        """Logits [R, V] at the last position and hidden states [R, width, H] of the last `width` positions.

        `queries`: whether the inputs hold query blocks, kept on the host (reading `blocks` would wait for the
        device every step)."""
        q = embeds.shape[1]
        if queries:  # they see their whole block
            attention = block_causal_mask(self.mask, self.blocks, q, embeds.dtype)
        else:
            attention = self.mask
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=self.past if self.config.use_cache else None,
            use_cache=self.config.use_cache,
            logits_to_keep=1,
            output_hidden_states=self.need_hidden,
        )
        self.past = out.past_key_values
        # a copy, not a view, which would keep the whole [R, T, H] (the prefill's) until the next step
        hidden = out.last_hidden_state[:, -width:].clone() if self.need_hidden else None
        return out.logits[:, -1].float(), hidden

    # ---- one step: what each row writes next ---------------------------------------------------

    def _choose(self, logits: torch.Tensor, hidden: torch.Tensor | None) -> list[_Feed]:
        """Every row's next input, decided in a fixed order, so that a seeded run draws the same random
        numbers with or without the cache: finished rows pad; heads write features; full spans get their
        end token; parallel spans their queries; then codes, then text are sampled."""
        feeds: list[_Feed | None] = [None] * self.batch_size
        for r, row in enumerate(self.rows):
            if row.finish:
                feeds[r] = _Feed(self.pad)
        for rule in self.rules.continuous:
            self._write_features(rule, feeds, hidden)
        for r, row in enumerate(self.rows):
            if feeds[r] is None and row.span is not None and row.span.length and len(row.body) == row.span.length:
                feeds[r] = _Feed(row.span.end_id)
            elif feeds[r] is None and row.span is not None and row.span.parallel:
                feeds[r] = _Feed(row.span.placeholder_id, queries=row.span.length)
        for rule in self.rules.discrete:
            rows = [r for r, row in enumerate(self.rows) if feeds[r] is None and row.span is rule]
            codes = self._tokens(rows, logits, self.config.codes, self.rules.code_allowed[rule.modality])
            for r, token in zip(rows, codes):
                feeds[r] = _Feed(token)
        rows = [r for r in range(self.batch_size) if feeds[r] is None]
        for r, token in zip(rows, self._tokens(rows, logits, self.config.text, self.rules.text_allowed)):
            feeds[r] = _Feed(token)
        for r, row in enumerate(self.rows):
            if not row.finish:
                feeds[r] = self._write(r, row, feeds[r])
        return feeds

    def _write_features(self, rule: SpanRule, feeds: list[_Feed | None], hidden: torch.Tensor) -> None:
        """Sample the features of `rule`'s open spans: one per sequential span, a whole item per parallel one."""
        if rule.parallel:
            rows = [r for r, row in enumerate(self.rows) if feeds[r] is None and row.span is rule and row.awaiting]
        else:
            rows = [
                r for r, row in enumerate(self.rows)
                if feeds[r] is None and row.span is rule and len(row.body) < rule.length
            ]
        if not rows:
            return
        n = rule.length if rule.parallel else 1
        index = torch.tensor(rows, device=hidden.device)
        cfg = self.config.continuous.cfg_scale if self.guided else 1.0
        h = hidden[index, -n:]  # [k, n, H]
        if cfg != 1.0:
            h = torch.cat([h, hidden[index + self.batch_size, -n:]])
        head = self.model.heads[rule.modality]
        options = self.config.continuous.options.get(rule.modality, {})
        out = head.sample(h.flatten(0, 1), self.config.continuous.temperature, cfg, generator=self.generator, **options)
        out = out[: len(rows) * n].unflatten(0, (len(rows), n))  # the conditional half: [k, n, D]
        for r, feats in zip(rows, out):
            row = self.rows[r]
            if rule.parallel:
                row.body, row.awaiting = list(feats), False
            else:
                feeds[r] = _Feed(rule.placeholder_id, feature=feats[0])

    def _tokens(
        self, rows: list[int], logits: torch.Tensor, sampling: TokenSampling, allowed: torch.Tensor
    ) -> list[int]:
        """One token for each of `rows`, from their (guided) logits restricted to `allowed`."""
        if not rows:
            return []
        index = torch.tensor(rows, device=logits.device)
        uncond = logits[index + self.batch_size] if self.guided else None
        chosen = choose_tokens(
            guided_logits(logits[index], uncond, sampling.cfg_scale),
            allowed,
            sampling,
            seen=None if self.seen is None else self.seen[index],
            generator=self.generator,
        )
        return chosen.tolist()

    # ---- bookkeeping ------------------------------------------------------------------------------

    def _write(self, r: int, row: _Row, feed: _Feed) -> _Feed:
        """Record row r's next input; returns the feed, or a pad feed if the row is finished instead."""
        n = feed.queries or 1
        if len(row.ids) + n > self.config.max_new_tokens:
            return self._finish(r, row, "length")
        if self.seen is not None:
            self.seen[r, feed.token] = True
        if row.span is None and feed.token in self.ends:
            return self._finish(r, row, "eos")
        row.ids += [feed.token] * n
        if feed.queries:
            row.awaiting = True
        elif row.span is not None and feed.token == row.span.end_id:
            self._close_span(r, row)
        elif row.span is not None:
            row.body.append(feed.feature if row.span.continuous else feed.token - row.span.code_range[0])
        elif feed.token in self.rules.by_begin:
            self._flush_text(r, row)
            row.span, row.body, row.emitted = self.rules.by_begin[feed.token], [], 0
        else:
            self._write_text(r, row, feed.token)
        if len(row.ids) >= self.config.max_new_tokens and not row.finish:
            self._finish(r, row, "length")
        return feed

    def _write_text(self, r: int, row: _Row, token: int) -> None:
        if not row.segments or isinstance(row.segments[-1], MediaSpan):
            row.segments.append([])
        run = row.segments[-1]
        run.append(token)
        if not (self.on_text or self.config.stop_strings):
            return
        text = self.decode_text(run)
        if self.on_text and text[row.emitted :] and not text.endswith("\ufffd"):  # wait for a whole character
            self.on_text(r, text[row.emitted :])
            row.emitted = len(text)
        if any(stop in text for stop in self.config.stop_strings):
            self._finish(r, row, "stop")

    def _flush_text(self, r: int, row: _Row) -> None:
        """Stream whatever of the current text run is still held back."""
        if self.on_text and row.segments and isinstance(row.segments[-1], list):
            text = self.decode_text(row.segments[-1])
            if text[row.emitted :]:
                self.on_text(r, text[row.emitted :])
            row.emitted = len(text)

    def _close_span(self, r: int, row: _Row) -> None:
        rule = row.span
        tokens = torch.stack(row.body) if rule.continuous else torch.tensor(row.body, dtype=torch.long)
        span = MediaSpan(rule.modality, tokens)
        row.segments.append(span)
        row.span, row.body = None, []
        if self.on_media:
            self.on_media(r, span)

    def _finish(self, r: int, row: _Row, reason: str) -> _Feed:
        if row.span is None:
            self._flush_text(r, row)
        row.finish = reason
        return _Feed(self.pad)

    def _open_prompt_span(self, row: _Row, r: int, batch: MultimodalBatch) -> None:
        """A prompt may end inside a media span (e.g. with <image>, to ask for an image): continue it."""
        ids = batch.input_ids[r][batch.attention_mask[r].bool()].tolist()
        found = self.rules.open_span(ids)
        if found is None:
            return
        rule, count = found
        row.span = rule
        if count and rule.parallel:
            raise ValueError(f"row {r}: a parallel {rule.modality} span cannot continue from {count} given features")
        if rule.length and count > rule.length:  # the span would never reach N, so never end
            given = "features" if rule.continuous else "codes"
            raise ValueError(
                f"row {r}: the prompt's open {rule.modality} span already holds {count} {given}, more than its "
                f"tokens_per_item ({rule.length})"
            )
        if not rule.continuous:
            row.body = [t - rule.code_range[0] for t in ids[len(ids) - count :]]
        elif count:
            if rule.modality not in batch.features:  # it was a KeyError, before the prefill could name it
                raise ValueError(f"row {r}: the prompt's open {rule.modality} span holds {count} placeholders, "
                                 f"but the batch has no {rule.modality} features")
            slots = (batch.input_ids == rule.placeholder_id) & batch.attention_mask.bool()
            end = int(slots[: r + 1].sum())  # this row's slots end here, in reading order
            row.body = list(batch.features[rule.modality][end - count : end].to(self.model.dtype))  # as the head's

    def _seen(self, batch: MultimodalBatch) -> torch.Tensor | None:
        """[B, V] bool: the ids each row has seen, for the repetition penalty (None when it is off)."""
        if self.config.text.repetition_penalty == 1.0 and self.config.codes.repetition_penalty == 1.0:
            return None
        counts = torch.zeros(self.batch_size, self.rules.text_allowed.shape[0], device=batch.input_ids.device)
        return counts.scatter_add_(1, batch.input_ids, batch.attention_mask.float()) > 0


def _stack(cond: MultimodalBatch, uncond: MultimodalBatch, pad: int) -> MultimodalBatch:
    """One batch [cond rows; uncond rows], left-padded to a common length."""
    length = max(cond.input_ids.shape[1], uncond.input_ids.shape[1])

    def left(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (length - t.shape[1], 0), value=value)

    features, targets = {}, {}
    for m in sorted(set(cond.features) | set(uncond.features)):
        parts = [b for b in (cond, uncond) if m in b.features]
        features[m] = torch.cat([b.features[m] for b in parts])
        targets[m] = torch.cat([
            b.feature_targets.get(m, torch.zeros(b.features[m].shape[0], dtype=torch.bool, device=b.features[m].device))
            for b in parts
        ])
    return MultimodalBatch(
        input_ids=torch.cat([left(cond.input_ids, pad), left(uncond.input_ids, pad)]),
        attention_mask=torch.cat([left(cond.attention_mask, 0), left(uncond.attention_mask, 0)]),
        features=features,
        feature_targets=targets,
    )
