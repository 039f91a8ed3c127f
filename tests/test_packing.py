"""Packing: a packed forward equals each document run alone; labels, positions and features per document."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mllm.data.packing import collate_rows, first_fit_decreasing, pack, pack_collate, pack_stream
from mllm.model import MultimodalLM
from mllm.sequence import IGNORE_INDEX, Sample, pad_collate
from tests.conftest import TINY_LMS
from tests.test_model import IMAGE_DIM, layout_for

T = 40  # max_length of the packed rows


@pytest.fixture(scope="module")
def models() -> dict[str, MultimodalLM]:
    """The same tiny llama (text vocab 300 + image features + audio codes) under each attention implementation."""
    out = {}
    for attn in ("sdpa", "eager"):
        torch.manual_seed(0)  # same seed, same weights
        cfg = dict(TINY_LMS["llama"], vocab_size=300)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        base = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        out[attn] = MultimodalLM.from_base(base, layout_for()).eval()
        assert out[attn].language_model.config._attn_implementation == attn
    assert torch.equal(out["sdpa"].get_input_embeddings().weight, out["eager"].get_input_embeddings().weight)
    return out


def document(n: int, seed: int, images: int = 0, target: bool = False) -> Sample:
    """n text tokens with `images` 3-slot image spans in the middle; labels on the second half."""
    layout = layout_for()
    img = layout["image"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 300, (n,), generator=g).tolist()
    for _ in range(images):
        ids[n // 2 : n // 2] = [img.begin_id] + [img.placeholder_id] * 3 + [img.end_id]
    ids = torch.tensor(ids)
    labels = torch.where(torch.arange(len(ids)) >= len(ids) // 2, ids, IGNORE_INDEX)
    labels[ids == img.placeholder_id] = IGNORE_INDEX
    features = {"image": torch.randn(3 * images, IMAGE_DIM, generator=g)} if images else {}
    targets = {"image": torch.full((3 * images,), target)} if images else {}
    return Sample(ids, labels, features, targets)


DOCS = [document(11, 1, images=1), document(7, 2), document(13, 3, images=2, target=True), document(5, 4), document(20, 5)]


def run(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch.model_inputs(), **kwargs)


def alone(model, doc: Sample):
    return run(model, pad_collate([doc], pad_id=0))


def doc_spans(rows):
    """(row, start, sample) of each document in rows."""
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            yield r, start, s
            start += len(s)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_each_document_alone(models, attn):
    model = models[attn]
    rows = pack(DOCS, T)
    assert len(rows) == 2 and all(len(row) > 1 for row in rows)  # documents do share rows
    batch = collate_rows(rows, T, pad_id=0, attn_implementation=attn)
    assert batch.attention_mask.shape == (2, 1, T, T)
    packed = run(model, batch)
    slot = 0
    for r, start, s in doc_spans(rows):
        single = alone(model, s)
        torch.testing.assert_close(packed.logits[r, start : start + len(s)], single.logits[0], atol=1e-5, rtol=1e-5)
        n_targets = int(s.feature_targets["image"].sum()) if "image" in s.features else 0
        if n_targets:  # the hidden state before each target slot is the document's own
            torch.testing.assert_close(packed.slot_hidden["image"][slot : slot + n_targets], single.slot_hidden["image"], atol=1e-5, rtol=1e-5)
        slot += n_targets


def test_packed_parallel_targets_equal_each_document_alone():
    """Parallel-mode (query) targets in packed rows: the block mask is built per document, padding tail included."""
    torch.manual_seed(0)
    cfg = dict(TINY_LMS["llama"], vocab_size=300)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), attn_implementation="sdpa")
    heads = {"image": {"name": "regression", "parallel": True}}
    model = MultimodalLM.from_base(base, layout_for(), heads=heads, tokens_per_item={"image": 3}).eval()
    rows = pack(DOCS, T)
    packed = run(model, collate_rows(rows, T, pad_id=0, attn_implementation="sdpa"))
    slot = 0
    for _, _, s in doc_spans(rows):
        n_targets = int(s.feature_targets["image"].sum()) if "image" in s.features else 0
        if n_targets:
            single = alone(model, s)
            torch.testing.assert_close(packed.slot_hidden["image"][slot : slot + n_targets], single.slot_hidden["image"],
                                       atol=1e-5, rtol=1e-5)
        slot += n_targets
    assert slot > 0


def test_flash_layout_is_one_flat_sequence_split_where_positions_restart(models):
    """The flash-attn layout (position ids only) checked on CPU: transformers builds the same
    block-diagonal mask from the position restarts under sdpa (when no KV cache is kept) as
    flash-attn's varlen kernel uses."""
    model = models["sdpa"]
    rows = pack(DOCS, T)
    batch = collate_rows(rows, T, pad_id=0, attn_implementation="flash_attention_2")
    assert batch.attention_mask is None and batch.input_ids.shape == (1, 2 * T)
    packed = run(model, batch, use_cache=False)
    for r, start, s in doc_spans(rows):
        offset = r * T + start
        torch.testing.assert_close(packed.logits[0, offset : offset + len(s)], alone(model, s).logits[0], atol=1e-5, rtol=1e-5)


def test_the_packed_loss_is_the_token_weighted_loss_of_the_documents(models):
    model = models["sdpa"]
    packed = run(model, pack_collate(DOCS, T, pad_id=0)).loss
    total = n = 0
    for doc in DOCS:
        k = int((doc.labels[1:] != IGNORE_INDEX).sum())
        total, n = total + alone(model, doc).loss * k, n + k
    torch.testing.assert_close(packed, total / n, atol=1e-5, rtol=1e-5)


def test_labels_never_cross_a_document_boundary():
    docs = [Sample(torch.arange(1, 6), torch.arange(1, 6)), Sample(torch.arange(6, 10), torch.arange(6, 10))]
    batch = collate_rows([docs], 12, pad_id=0)
    # logits at t predict labels[t + 1]: position 5 (first of doc 2) must not be predicted from doc 1's last token
    assert batch.labels[0].tolist() == [-100, 2, 3, 4, 5, -100, 7, 8, 9, -100, -100, -100]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    assert batch.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0]
    mask = batch.attention_mask[0, 0]
    assert mask[6, :5].sum() == 0 and mask[6, 5:7].all() and not mask[6, 7:].any()  # doc 2 sees only itself
    assert mask[10, 9:11].all() and mask[10, :9].sum() == 0  # the padding is a document of its own
    assert mask.any(-1).all()  # no fully masked query row


def test_eager_mask_is_additive_in_the_model_dtype():
    docs = [Sample(torch.arange(3), torch.arange(3))] * 2
    mask = collate_rows([docs], 8, pad_id=0, attn_implementation="eager", dtype=torch.bfloat16).attention_mask
    assert mask.dtype == torch.bfloat16 and mask[0, 0, 4, 2] == torch.finfo(torch.bfloat16).min and mask[0, 0, 4, 3] == 0


def test_features_are_concatenated_in_packed_order():
    rows = pack(DOCS, T)
    batch = collate_rows(rows, T, pad_id=0)
    order = [s for row in rows for s in row if "image" in s.features]
    assert torch.equal(batch.features["image"], torch.cat([s.features["image"] for s in order]))
    assert torch.equal(batch.feature_targets["image"], torch.cat([s.feature_targets["image"] for s in order]))


def test_first_fit_decreasing_fills_bins_and_refuses_what_cannot_fit():
    lengths = [5, 9, 2, 7, 3, 4, 6]
    bins = first_fit_decreasing(lengths, 12)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 12 for b in bins) and len(bins) == 3  # 36 tokens, 3 bins of 12
    with pytest.raises(ValueError, match="item 1 is 13 long, over the capacity 12"):
        first_fit_decreasing([3, 13], 12)
    with pytest.raises(ValueError, match="over the capacity"):
        pack_collate([Sample(torch.arange(13), torch.arange(13))], 12, pad_id=0)


def test_pack_stream_yields_full_batches_and_every_sample_once():
    g = torch.Generator().manual_seed(0)
    samples = [Sample(torch.full((n,), i), torch.full((n,), i)) for i, n in enumerate(torch.randint(3, 40, (300,), generator=g).tolist())]
    batches = list(pack_stream(samples, 64, rows=4, buffer_size=50))
    assert all(len(b) == 4 for b in batches[:-1]) and 1 <= len(batches[-1]) <= 4
    seen = sorted(int(s.input_ids[0]) for rows in batches for row in rows for s in row)
    assert seen == list(range(300))
    fill = sum(len(s) for s in samples) / (sum(len(rows) for rows in batches) * 64)
    assert fill > 0.9


def test_pack_stream_order_is_seeded_not_fullest_first():
    """Rows of one buffer round come out shuffled by the seed: the fullest rows are not all in the first batches."""
    samples = [Sample(torch.full((n,), i), torch.full((n,), i)) for i, n in enumerate([60, 50, 40, 30, 20, 10, 5, 3] * 8)]

    def fills(seed):
        return [[sum(map(len, row)) for row in rows] for rows in pack_stream(samples, 64, rows=2, buffer_size=64, seed=seed)]

    assert fills(0) == fills(0)
    assert fills(0) != fills(1)
    by_batch = [sum(f) for f in fills(0)]
    assert by_batch != sorted(by_batch, reverse=True)


def test_an_unsupported_attention_implementation_is_refused():
    with pytest.raises(ValueError, match="sdpa, eager and flash_attention"):
        pack_collate(DOCS[:1], T, pad_id=0, attn_implementation="flex_attention")
