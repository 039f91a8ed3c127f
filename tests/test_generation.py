"""The generation engine: KV-cached steps equal recomputation, spans obey their rules, guidance, streaming."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mllm.generation import GenerationConfig, HeadSampling, MediaSpan, TokenSampling, generate, greedy_generate
from mllm.generation.engine import _Engine
from mllm.generation.sampling import guided_logits, repetition_penalty, top_k_filter, top_p_filter
from mllm.generation.spans import SpanRules
from mllm.sequence import IGNORE_INDEX, Sample, pad_collate
from tests.test_model import IMAGE_DIM, VIDEO_DIM, image_sequence, with_heads, wrapped

N = {"audio": 4, "image": 3, "video": 2}
# image: sequential GMM features; video: a parallel (Divot-style) span; audio: discrete codes.
HEADS = {"image": {"name": "gmm", "options": {"mode": "mode"}}, "video": {"name": "regression", "parallel": True}}


def model_with_spans(arch: str = "llama", heads: dict | None = None):
    return with_heads(arch, heads or HEADS, tokens_per_item=N)


def prompts(model, *endings: str | None) -> list[Sample]:
    """One prompt per ending: a few text ids, then the begin token of that modality (None: text only)."""
    samples = []
    for i, ending in enumerate(endings):
        ids = [5 + i, 6 + i, 7][: 2 + i % 2] + ([model.layout[ending].begin_id] if ending else [])
        samples.append(Sample(torch.tensor(ids), torch.tensor(ids)))
    return samples


def batch_of(samples: list[Sample]):
    return pad_collate(samples, pad_id=0, padding_side="left")


def assert_same(a, b, atol: float = 1e-5) -> None:
    assert [g.ids for g in a] == [g.ids for g in b]
    assert [g.finish_reason for g in a] == [g.finish_reason for g in b]
    for x, y in zip(a, b):
        assert [m.modality for m in x.media] == [m.modality for m in y.media]
        for m, n in zip(x.media, y.media):
            assert torch.allclose(m.tokens.float(), n.tokens.float(), atol=atol), m.modality


# ---- the KV cache ----------------------------------------------------------------------------------


def recompute_greedy(model, ids: torch.Tensor, feats: torch.Tensor, steps: int) -> list[int]:
    out = []
    for _ in range(steps):
        logits = model(ids, features={"image": feats}).logits
        token = logits[0, -1].argmax()
        out.append(int(token))
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return out


def test_cached_greedy_matches_recomputation_with_left_padding(arch):
    model, _ = wrapped(arch)
    torch.manual_seed(1)
    long_ids, short_ids = image_sequence(model.layout, n=3)[0], image_sequence(model.layout, n=1)[0]
    feats_long, feats_short = torch.randn(6, IMAGE_DIM), torch.randn(2, IMAGE_DIM)
    samples = [
        Sample(long_ids, long_ids, {"image": feats_long}, {"image": torch.zeros(6, dtype=torch.bool)}),
        Sample(short_ids, short_ids, {"image": feats_short}, {"image": torch.zeros(2, dtype=torch.bool)}),
    ]
    batch = pad_collate(samples, pad_id=0, padding_side="left")
    with torch.no_grad():
        got = greedy_generate(model, batch, max_new_tokens=8, eos_token_id=None)
        want = [recompute_greedy(model, long_ids[None], feats_long, 8), recompute_greedy(model, short_ids[None], feats_short, 8)]
    assert got == want


def test_cache_gives_the_same_tokens_and_features_as_recomputation(arch):
    """Every kind of span, sampled with a seed: the cached engine and the one that recomputes agree."""
    model = model_with_spans(arch, {**HEADS, "image": {"name": "diffusion"}})
    batch = batch_of(prompts(model, "audio", "image", "video", None))
    sampling = TokenSampling(temperature=1.0, top_k=50)
    config = GenerationConfig(max_new_tokens=14, seed=0, text=sampling, codes=sampling)
    cached = generate(model, batch, config)
    recomputed = generate(model, batch, GenerationConfig(**{**vars(config), "use_cache": False}))
    assert_same(cached, recomputed)
    assert [m.modality for g in cached for m in g.media] == ["audio", "image", "video"]


def test_the_engine_keeps_the_input_embeddings_only_without_a_cache(monkeypatch):
    """The whole prefill's [R, T, H] embeddings are read only to recompute every step without a cache."""
    model = model_with_spans()
    engines, prefill = [], _Engine._prefill
    monkeypatch.setattr(_Engine, "_prefill", lambda self, inputs: (engines.append(self), prefill(self, inputs))[1])
    batch = batch_of(prompts(model, "image", "video"))
    cached = generate(model, batch, GenerationConfig(max_new_tokens=6))
    recomputed = generate(model, batch, GenerationConfig(max_new_tokens=6, use_cache=False))
    assert engines[0].embeds is None and engines[1].embeds.shape[1] == batch.input_ids.shape[1] + 6
    assert_same(cached, recomputed)


def test_greedy_output_is_what_one_full_forward_pass_predicts():
    """An independent check: teacher-force each generated row and re-derive every choice from one forward pass."""
    model = model_with_spans()
    samples = prompts(model, "image", "video", "audio", None)
    results = generate(model, batch_of(samples), GenerationConfig(max_new_tokens=12))
    rules = SpanRules(model, model.get_output_embeddings().weight.shape[0], torch.device("cpu"))
    image, video = model.layout["image"], model.layout["video"]
    ends = {model.layout[m].end_id for m in N}
    for sample, result in zip(samples, results):
        ids = torch.cat([sample.input_ids, torch.tensor(result.ids)])[None]
        feats = {s.modality: s.tokens for s in result.media if s.modality != "audio"}
        # Parallel spans are targets: their slots stay queries, as they were while generating.
        targets = {m: torch.full((len(f),), m == "video") for m, f in feats.items()}
        with torch.no_grad():
            out = model(ids, features=feats, feature_targets=targets, output_hidden_states=True)
        hidden, row = out.last_hidden_state[0], {"image": 0, "video": 0}
        for p in range(sample.input_ids.numel(), ids.shape[1]):
            token = int(ids[0, p])
            if token in (image.placeholder_id, video.placeholder_id):
                m = "image" if token == image.placeholder_id else "video"
                source = p - 1 if m == "image" else p  # a parallel slot predicts its own feature
                expected = model.heads[m].sample(hidden[source : source + 1])[0]
                assert torch.allclose(feats[m][row[m]], expected, atol=1e-5), (m, p)
                row[m] += 1
            elif token not in ends:  # end tokens are forced
                rule = next((r for r in rules.discrete if r.code_range[0] <= token < r.code_range[1]), None)
                allowed = rules.text_allowed if rule is None else rules.code_allowed[rule.modality]
                assert token == int(out.logits[0, p - 1].masked_fill(~allowed, float("-inf")).argmax()), p
    assert [len(g.media) for g in results[:3]] == [1, 1, 1]


# ---- spans -------------------------------------------------------------------------------------------


def parse(ids: list[int], layout, open_span: str | None = None) -> list[tuple[str, list[int], bool]]:
    """Split generated ids into (modality, body, closed) spans, asserting that text holds no media ids
    and that a span holds only its own codes or placeholders."""
    media_ids = {t for m in layout.modalities.values() for t in (m.end_id, m.placeholder_id) if t >= 0}
    media_ids |= {t for m in layout.modalities.values() for t in range(*m.code_range)}
    begins = {m.begin_id: name for name, m in layout.modalities.items()}
    spans, current = [], ([open_span, [], False] if open_span else None)
    for t in ids:
        if current is None:
            assert t not in media_ids, f"media id {t} outside a span"
            if t in begins:
                current = [begins[t], [], False]
            continue
        m = layout[current[0]]
        if t == m.end_id:
            spans.append((current[0], current[1], True))
            current = None
        else:
            assert t == m.placeholder_id or m.code_range[0] <= t < m.code_range[1], f"{t} inside a {current[0]} span"
            current[1].append(t)
    return spans + ([tuple(current)] if current else [])


def test_forced_spans_hold_exactly_n_codes_in_range():
    model = model_with_spans()
    hot = TokenSampling(temperature=3.0)
    endings = ("audio", "audio", None, "audio")
    results = generate(model, batch_of(prompts(model, *endings)), GenerationConfig(max_new_tokens=40, seed=1, text=hot, codes=hot))
    closed = 0
    for ending, g in zip(endings, results):
        for modality, body, is_closed in parse(g.ids, model.layout, ending):
            assert len(body) == N[modality] if is_closed else len(body) <= N[modality]
            closed += is_closed
        for span in g.media:
            assert span.modality != "audio" or (len(span.tokens) == N["audio"] and 0 <= span.tokens.min() and span.tokens.max() < 16)
    assert closed >= 3


def test_text_never_writes_codes_placeholders_or_end_tokens():
    model = model_with_spans()
    hot = TokenSampling(temperature=5.0)
    for g in generate(model, batch_of(prompts(model, None, None, None)), GenerationConfig(max_new_tokens=30, seed=0, text=hot)):
        parse(g.ids, model.layout)


def test_a_discrete_modality_without_n_ends_its_own_span():
    model = with_heads("llama", {}, tokens_per_item={"audio": 0})
    rules = SpanRules(model, model.get_output_embeddings().weight.shape[0], torch.device("cpu"))
    audio = model.layout["audio"]
    assert rules.code_allowed["audio"][audio.end_id] and rules.code_allowed["audio"][slice(*audio.code_range)].all()
    assert not rules.text_allowed[model.layout["image"].begin_id], "image has no head: it cannot be written"
    with torch.no_grad():  # make the end token the likeliest code-span choice
        model.get_output_embeddings().weight[audio.end_id] = model.get_output_embeddings().weight[:300].mean(0) * 50
    g = generate(model, batch_of(prompts(model, "audio")), GenerationConfig(max_new_tokens=6))[0]
    assert g.media and len(g.media[0].tokens) < 6 and g.ids[len(g.media[0].tokens)] == audio.end_id


def test_continuous_head_without_n_is_an_error():
    model = with_heads("llama", {"image": {"name": "gmm"}})
    with pytest.raises(ValueError, match="image has an output head but tokens_per_item is 0"):
        generate(model, batch_of(prompts(model, None)), GenerationConfig(max_new_tokens=2))


def test_a_prompt_may_end_inside_a_span():
    model = model_with_spans()
    audio, image = model.layout["audio"], model.layout["image"]
    given = torch.randn(2, IMAGE_DIM)
    samples = [
        Sample(torch.tensor([5, audio.begin_id, audio.code_offset + 7]), torch.zeros(3, dtype=torch.long)),
        Sample(torch.tensor([5, image.begin_id, image.placeholder_id, image.placeholder_id]), torch.zeros(4, dtype=torch.long),
               {"image": given}, {"image": torch.zeros(2, dtype=torch.bool)}),
    ]
    codes, feats = generate(model, batch_of(samples), GenerationConfig(max_new_tokens=4))
    assert codes.ids[N["audio"] - 1] == audio.end_id and codes.media[0].tokens[0] == 7  # 1 code given, 3 written
    assert feats.ids[0] == image.placeholder_id and feats.ids[1] == image.end_id
    assert torch.equal(feats.media[0].tokens[:2], given)
    with pytest.raises(ValueError, match="row 1: the prompt's open image span holds 2 placeholders, but the batch has no"):
        generate(model, batch_of([samples[0], Sample(samples[1].input_ids, samples[1].labels)]))


def test_a_continued_span_is_in_the_models_dtype():
    """The given features arrive in fp32, as the processor makes them; the span a bf16 model finishes is bf16
    throughout, as one it writes whole is."""
    model = model_with_spans().to(torch.bfloat16)
    image = model.layout["image"]
    given = torch.randn(2, IMAGE_DIM)
    sample = Sample(torch.tensor([5, image.begin_id, image.placeholder_id, image.placeholder_id]),
                    torch.zeros(4, dtype=torch.long), {"image": given}, {"image": torch.zeros(2, dtype=torch.bool)})
    out = generate(model, batch_of([sample]), GenerationConfig(max_new_tokens=4))[0]
    (span,) = out.media
    assert span.tokens.dtype == torch.bfloat16 and span.tokens.shape == (N["image"], IMAGE_DIM)
    assert torch.equal(span.tokens[:2], given.to(torch.bfloat16))


def test_writes_limits_the_media_a_reply_may_open():
    model = model_with_spans()
    vocab = model.get_output_embeddings().weight.shape[0]
    layout = model.layout
    every = SpanRules(model, vocab, torch.device("cpu"))
    audio_only = SpanRules(model, vocab, torch.device("cpu"), writes=["audio"])
    text_only = SpanRules(model, vocab, torch.device("cpu"), writes=[])
    assert sorted(r.modality for r in every.rules) == ["audio", "image", "video"]
    assert [r.modality for r in audio_only.rules] == ["audio"] and text_only.rules == []
    for m in ("audio", "image", "video"):
        assert every.text_allowed[layout[m].begin_id]
        assert bool(audio_only.text_allowed[layout[m].begin_id]) == (m == "audio")
        assert not text_only.text_allowed[layout[m].begin_id]
    with pytest.raises(ValueError, match="writes: 'smell' is no modality of this model"):
        SpanRules(model, vocab, torch.device("cpu"), writes=["smell"])
    with pytest.raises(ValueError, match="writes must be a list of modality names"):
        GenerationConfig(writes="image")
    # the image begin made the likeliest token everywhere: opened unless the reply may not write images
    model.get_output_embeddings().weight.data[layout["image"].begin_id] = 50 * model.get_input_embeddings().weight.data[5]
    opened = generate(model, batch_of(prompts(model, None)), GenerationConfig(max_new_tokens=2))[0].ids
    kept = generate(model, batch_of(prompts(model, None)), GenerationConfig(max_new_tokens=2, writes=[]))[0].ids
    assert opened[0] == layout["image"].begin_id and layout["image"].begin_id not in kept


def test_prompt_target_flags_must_be_bool():
    model = model_with_spans()
    video = model.layout["video"]
    flags = torch.tensor([0, 1])  # 0/1 integers: ~flags would pick rows -1 and -2 as the input features
    sample = Sample(torch.tensor([5, video.begin_id, video.placeholder_id, video.placeholder_id, video.end_id, 6]),
                    torch.zeros(6, dtype=torch.long), {"video": torch.randn(2, VIDEO_DIM)}, {"video": flags})
    with pytest.raises(ValueError, match="video: feature_targets must be a 1-D bool mask, got torch.int64"):
        generate(model, batch_of([sample]), GenerationConfig(max_new_tokens=2))


def test_a_prompt_span_holding_more_than_n_items_is_an_error():
    """More than N codes or features already given would never reach N, so never end: the span ran to the length
    limit. N of them is a full span, which the end token closes."""
    model = model_with_spans()
    audio, image = model.layout["audio"], model.layout["image"]

    def codes(n: int) -> Sample:
        return Sample(torch.tensor([5, audio.begin_id] + [audio.code_offset + 1] * n), torch.zeros(n + 2, dtype=torch.long))

    features = Sample(torch.tensor([5, image.begin_id] + [image.placeholder_id] * 4), torch.zeros(6, dtype=torch.long),
                      {"image": torch.randn(4, IMAGE_DIM)}, {"image": torch.zeros(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"row 1: the prompt's open audio span already holds 5 codes, more than its "
                                         r"tokens_per_item \(4\)"):
        generate(model, batch_of([codes(1), codes(5)]), GenerationConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match=r"row 0: the prompt's open image span already holds 4 features, more than"):
        generate(model, batch_of([features]), GenerationConfig(max_new_tokens=4))
    full = generate(model, batch_of([codes(N["audio"])]), GenerationConfig(max_new_tokens=2))[0]
    assert full.ids[0] == audio.end_id and full.media[0].tokens.tolist() == [1] * N["audio"]


def test_parallel_span_comes_from_one_forward_pass():
    model = model_with_spans()
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    g = generate(model, batch_of(prompts(model, "video")), GenerationConfig(max_new_tokens=4))[0]
    video = model.layout["video"]
    assert g.ids[: N["video"] + 1] == [video.placeholder_id] * N["video"] + [video.end_id]
    assert g.media[0].tokens.shape == (N["video"], VIDEO_DIM)
    assert calls[1] == N["video"], "the queries go in together, after the prefill"


def test_a_parallel_span_refuses_flash_attention():
    """Its queries' 4D block-causal mask would be read as a padding mask by a flash attention set after loading."""
    model = model_with_spans()
    model.language_model.config._attn_implementation = "flash_attention_2"  # as set_attn_implementation sets it
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' cannot serve the parallel head of video"):
        generate(model, batch_of(prompts(model, "video")), GenerationConfig(max_new_tokens=4))


def test_batch_rows_equal_single_rows():
    """Padding, parallel steps beside single-token rows, and per-row spans leave each row's result unchanged."""
    model = model_with_spans()
    samples = prompts(model, "video", None, "audio", "image")
    together = generate(model, batch_of(samples), GenerationConfig(max_new_tokens=10))
    alone = [generate(model, batch_of([s]), GenerationConfig(max_new_tokens=10))[0] for s in samples]
    assert_same(together, alone)


def test_heads_swap_by_config():
    for head in ("gmm", "diffusion", "regression"):
        model = model_with_spans("qwen2", {"image": {"name": head}})
        g = generate(model, batch_of(prompts(model, "image")), GenerationConfig(max_new_tokens=4, seed=0))[0]
        assert g.media[0].modality == "image" and g.media[0].tokens.shape == (N["image"], IMAGE_DIM)


# ---- guidance ------------------------------------------------------------------------------------------


def guidance_setup():
    model = model_with_spans(heads={**HEADS, "image": {"name": "diffusion"}})
    lo, hi = model.layout["audio"].code_range
    with torch.no_grad():  # new rows start equal, so all codes would tie
        model.get_output_embeddings().weight[lo:hi] += torch.randn(hi - lo, 64, generator=torch.Generator().manual_seed(0))
    cond = batch_of(prompts(model, "audio", "image", None))
    uncond = batch_of([Sample(torch.tensor([9] + s.input_ids[-1:].tolist()), torch.zeros(2, dtype=torch.long))
                       for s in prompts(model, "audio", "image", None)])
    return model, cond, uncond


def test_cfg_scale_one_equals_the_unguided_result():
    model, cond, uncond = guidance_setup()
    config = GenerationConfig(max_new_tokens=12, seed=0)
    plain = generate(model, cond, config)
    assert_same(generate(model, cond, config, uncond=uncond), plain, atol=0)
    # Guiding only the codes leaves the text and the features as they were, while the codes follow the guided logits.
    partly = generate(model, cond, GenerationConfig(max_new_tokens=12, seed=0, codes=TokenSampling(cfg_scale=10.0)), uncond=uncond)
    assert partly[2].ids == plain[2].ids and torch.allclose(partly[1].media[0].tokens, plain[1].media[0].tokens, atol=1e-5)
    with torch.no_grad():
        c, u = (model(b.input_ids[:1, b.attention_mask[0].bool()]).logits[0, -1] for b in (cond, uncond))
    lo, hi = model.layout["audio"].code_range
    assert partly[0].media[0].tokens[0] == guided_logits(c, u, 10.0)[lo:hi].argmax() != plain[0].media[0].tokens[0]


def test_guidance_between_identical_streams_changes_nothing():
    model, cond, _ = guidance_setup()
    guided = GenerationConfig(max_new_tokens=12, seed=0, text=TokenSampling(cfg_scale=2.0), codes=TokenSampling(cfg_scale=3.0),
                              continuous=HeadSampling(cfg_scale=4.0))
    assert_same(generate(model, cond, guided, uncond=cond), generate(model, cond, GenerationConfig(max_new_tokens=12, seed=0)))


def test_guided_logits_and_filters():
    cond, uncond = torch.randn(2, 10), torch.randn(2, 10)
    assert guided_logits(cond, uncond, 1.0) is cond
    c, u = cond.log_softmax(-1), uncond.log_softmax(-1)
    assert torch.allclose(guided_logits(cond, uncond, 3.0), u + 3 * (c - u))
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    assert top_k_filter(logits, 2).isfinite().tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)[0]  # 3.0: 0.63, 2.0: 0.23, 0.5: 0.05, -1.0: 0.01
    assert probs[3] < 0.7 < probs[3] + probs[0]
    assert top_p_filter(logits, 0.7).isfinite().tolist() == [[True, False, False, True]]
    assert top_p_filter(logits, 0.5).isfinite().tolist() == [[False, False, False, True]]
    seen = torch.tensor([[True, True, False, False]])
    assert repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]


@pytest.mark.parametrize("key", ["temperature", "repetition_penalty", "cfg_scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_sampling_settings_must_be_finite(key, value):
    """NaN passed every range check: a NaN repetition penalty made greedy decoding pick a seen token every step, an
    infinite temperature turned the masked logits into NaN and multinomial failed mid-generation."""
    with pytest.raises(ValueError, match=f"{key} must be a finite number, got {value}"):
        TokenSampling(**{key: value})
    if key != "repetition_penalty":
        with pytest.raises(ValueError, match=f"{key} must be a finite number, got {value}"):
            HeadSampling(**{key: value})
    with pytest.raises(ValueError, match=r"temperature must be >= 0 \(or None: each head's own\), got -1"):
        HeadSampling(temperature=-1)  # a GMM head read it as temperature 0


def test_guidance_needs_the_unconditional_prompts():
    model, cond, uncond = guidance_setup()
    with pytest.raises(ValueError, match="pass uncond="):
        generate(model, cond, GenerationConfig(text=TokenSampling(cfg_scale=2.0)))
    with pytest.raises(ValueError, match="uncond has 1 rows for 3 prompts"):
        generate(model, cond, GenerationConfig(text=TokenSampling(cfg_scale=2.0)), uncond=batch_of(prompts(model, None)))


# ---- text: stopping, streaming, sampling -----------------------------------------------------------


def decode(ids: list[int]) -> str:
    return "".join(f"<{i}>" for i in ids)


def test_streaming_callbacks_give_the_final_output():
    model = model_with_spans()
    batch = batch_of(prompts(model, "image", None, "video"))
    text, media = {}, {}
    results = generate(model, batch, GenerationConfig(max_new_tokens=12), decode_text=decode,
                       on_text=lambda row, delta: text.setdefault(row, []).append(delta),
                       on_media=lambda row, span: media.setdefault(row, []).append(span))
    for row, g in enumerate(results):
        assert "".join(text.get(row, [])) == "".join(s for s in g.items(decode) if isinstance(s, str))
        assert [id(s) for s in media.get(row, [])] == [id(s) for s in g.media]
    items = results[0].items(decode)
    assert isinstance(items[0], MediaSpan) and all(isinstance(s, str) for s in items[1:])


def test_stop_strings_eos_and_length():
    model = model_with_spans()
    batch = batch_of(prompts(model, None, None))
    free = generate(model, batch, GenerationConfig(max_new_tokens=8))
    assert all(g.finish_reason == "length" and len(g.ids) == 8 for g in free)
    stop = decode(free[0].ids[2:4])
    stopped = generate(model, batch, GenerationConfig(max_new_tokens=8, stop_strings=[stop]), decode_text=decode)
    assert stopped[0].ids == free[0].ids[:4] and stopped[0].finish_reason == "stop"
    eos = free[1].ids[3]
    ended = generate(model, batch, GenerationConfig(max_new_tokens=8, eos_token_id=eos))
    assert ended[1].ids == free[1].ids[:3] and ended[1].finish_reason == "eos"
    with pytest.raises(ValueError, match="need decode_text"):
        generate(model, batch, GenerationConfig(stop_strings=["x"]))


def test_eos_and_pad_must_be_token_ids_of_the_model():
    """A row that stops before the others is fed the pad, eos by default: eos -1 ("never") or a pad past the
    vocabulary died in the embedding lookup, an IndexError, as soon as rows finished at different steps."""
    model = model_with_spans()
    for key, value in (("eos_token_id", -1), ("pad_token_id", -1), ("pad_token_id", True)):
        with pytest.raises(ValueError, match=f"{key} must be a token id"):
            GenerationConfig(**{key: value})
    batch = batch_of(prompts(model, None, None))
    stop = generate(model, batch, GenerationConfig(max_new_tokens=4))[0].ids[1]  # row 0 stops, row 1 goes on
    vocab = model.get_output_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match=rf"pad_token_id \[{vocab}\] must be ids of the model's {vocab}-token"):
        generate(model, batch, GenerationConfig(max_new_tokens=4, pad_token_id=vocab, stop_token_ids=[stop]))
    with pytest.raises(ValueError, match=rf"eos_token_id and stop_token_ids \[{stop}, {vocab + 1}\] must be ids"):
        generate(model, batch, GenerationConfig(max_new_tokens=4, eos_token_id=vocab + 1, stop_token_ids=[stop], pad_token_id=0))


def test_sampling_is_reproducible_with_a_seed_and_penalised_repeats_are_rarer():
    model = model_with_spans()
    batch = batch_of(prompts(model, None, None, None))
    hot = GenerationConfig(max_new_tokens=16, seed=3, text=TokenSampling(temperature=1.0, top_p=0.9))
    assert [g.ids for g in generate(model, batch, hot)] == [g.ids for g in generate(model, batch, hot)]
    greedy = generate(model, batch, GenerationConfig(max_new_tokens=16))
    penalised = generate(model, batch, GenerationConfig(max_new_tokens=16, text=TokenSampling(repetition_penalty=100.0)))
    assert sum(len(set(g.ids)) for g in penalised) > sum(len(set(g.ids)) for g in greedy)
    assert all(len(set(g.ids)) == len(g.ids) for g in penalised)


def test_prompts_must_be_left_padded():
    model = model_with_spans()
    with pytest.raises(ValueError, match="prompts must be left-padded"):
        generate(model, pad_collate(prompts(model, None, "audio"), 0, "right"))
    right = pad_collate(prompts(model, None, "audio"), 0, "right")  # the unconditional prompts as well
    with pytest.raises(ValueError, match="uncond must be left-padded"):
        generate(model, batch_of(prompts(model, None, None)), GenerationConfig(text=TokenSampling(cfg_scale=3.0)), uncond=right)


# ---- end to end -------------------------------------------------------------------------------------------


def test_a_trained_model_writes_the_interleaved_output_it_learned(arch):
    """Train CE + head losses on one interleaved sequence; greedy generation from its first two tokens repeats it."""
    heads = {"image": {"name": "gmm", "options": {"mode": "mode", "num_components": 1}, "loss_weight": 0.2},
             "video": {"name": "regression", "parallel": True, "loss_weight": 0.2}}
    model = model_with_spans(arch, heads)
    layout = model.layout
    a, i, v = layout["audio"], layout["image"], layout["video"]
    codes = [3, 1, 4, 1]
    torch.manual_seed(0)
    image, video = torch.randn(3, IMAGE_DIM), torch.randn(2, VIDEO_DIM)
    ids = torch.tensor([5, 6, a.begin_id, *[a.code_offset + c for c in codes], a.end_id, 7, i.begin_id,
                        *[i.placeholder_id] * 3, i.end_id, 8, v.begin_id, *[v.placeholder_id] * 2, v.end_id, 9, 2])
    labels = ids.masked_fill((ids == i.placeholder_id) | (ids == v.placeholder_id), IGNORE_INDEX)
    targets = {"image": torch.ones(3, dtype=torch.bool), "video": torch.ones(2, dtype=torch.bool)}
    batch = pad_collate([Sample(ids, labels, {"image": image, "video": video}, targets)] * 4, pad_id=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # decayed to 0: at a constant 3e-3 the GMM head's variance makes the last step's image error swing between
    # 0.1 and 0.5, and which step lands where depends on the CPU's kernels (AVX2 against AVX-512)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 150)
    model.train()
    for _ in range(150):
        loss = model(**batch.model_inputs()).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    g = generate(model, batch_of([Sample(ids[:2], ids[:2])]), GenerationConfig(max_new_tokens=30, eos_token_id=2))[0]
    assert g.ids == ids[2:-1].tolist() and g.finish_reason == "eos"
    audio_out, image_out, video_out = g.media
    assert audio_out.tokens.tolist() == codes
    assert (image_out.tokens - image).abs().max() < 0.15 and (video_out.tokens - video).abs().max() < 0.15
    assert [type(s) for s in g.segments] == [MediaSpan, list, MediaSpan, list, MediaSpan, list]


# ---- host reads ---------------------------------------------------------------------------------------------


def test_a_decoding_step_reads_from_the_device_about_once():
    """On a GPU every read of a tensor's value waits for the device; HF generate reads about once per token.
    Counted on CPU as the profiler's aten::_local_scalar_dense: a text step of the multimodal model (query
    and feature checks in embed, the attention mask's choice) read 4 times per token before it read once."""
    model = model_with_spans().eval()
    batch = batch_of(prompts(model, None))
    config = GenerationConfig(max_new_tokens=32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        [g] = generate(model, batch, config)
    reads = sum(e.name == "aten::_local_scalar_dense" for e in prof.events())
    assert len(g.ids) == 32 and reads <= 1.5 * 32, reads
