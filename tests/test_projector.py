"""Input projectors: token-wise ones, the item-wise `context_gru`, and per-modality projector names."""

from __future__ import annotations

import pytest
import torch

from mllm.model import MultimodalLM, list_projectors
from mllm.model.modeling import item_lengths
from mllm.model.projector import ContextGRU
from mllm.registry import UnknownNameError
from tests.test_model import IMAGE_DIM, SMALL_HEAD, image_sequence, layout_for, tiny_lm

CONTEXT = {"image": "context_gru", "video": "mlp2x_gelu"}


def model_with(projector, heads: dict | None = None, tokens_per_item: dict | None = None) -> MultimodalLM:
    heads = {m: {**spec, "options": SMALL_HEAD[spec["name"]]} for m, spec in (heads or {}).items()}
    return MultimodalLM.from_base(tiny_lm("llama"), layout_for(video=True), projector=projector, heads=heads,
                                  tokens_per_item=tokens_per_item).eval()


def test_context_gru_is_registered():
    assert {"linear", "mlp2x_gelu", "context_gru"} <= set(list_projectors())


def test_item_lengths_are_runs_of_adjacent_slots_in_reading_order():
    slots = torch.tensor([[0, 1, 1, 0, 1, 1, 1], [1, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert item_lengths(slots) == [2, 3, 1, 2]  # a run ending one row and one starting the next stay apart
    assert item_lengths(torch.zeros(2, 4, dtype=torch.bool)) == []


def test_a_token_sees_its_whole_item_and_nothing_else():
    model = model_with(CONTEXT)
    ids = image_sequence(model.layout).repeat(2, 1)  # two rows, two 3-token images each
    feats = torch.randn(12, IMAGE_DIM)
    changed = feats.clone()
    changed[5] += 1.0  # the last token of row 0's second image
    slots = ids == model.layout["image"].placeholder_id
    with torch.no_grad():
        before, after = (model.embed(ids, {"image": f})[slots] for f in (feats, changed))
    moved = (before - after).abs().amax(-1) > 0  # [12], reading order
    assert moved.tolist() == [False] * 3 + [True] * 3 + [False] * 6  # earlier tokens of the item see it too


def test_a_batch_projects_as_its_rows_do_alone():
    """Left padding or other rows leave each item's projection unchanged (generation batches prompts)."""
    model = model_with(CONTEXT)
    ids = image_sequence(model.layout)
    short = torch.cat([torch.full((1, 8), 5), ids[:, :7]], dim=1)  # another row: one image, behind 8 pads
    feats = torch.randn(9, IMAGE_DIM)
    with torch.no_grad():
        together = model.embed(torch.cat([ids, short]), {"image": feats})
        alone = [model.embed(ids, {"image": feats[:6]}), model.embed(short, {"image": feats[6:]})]
    assert torch.allclose(together, torch.cat(alone), atol=1e-6)


def test_context_gru_learns_through_the_lm_loss():
    model = model_with(CONTEXT).train()
    ids = image_sequence(model.layout)
    model(ids, features={"image": torch.randn(6, IMAGE_DIM)}, labels=ids).loss.backward()
    gru = model.projectors["image"].gru
    assert all(p.grad is not None and p.grad.any() for p in gru.parameters())


def test_idle_context_projector_gets_a_zero_gradient_under_several_ranks():
    model = model_with(CONTEXT).train()
    model.touch_idle_modules = True
    ids = torch.tensor([[5, 6, 7, 8]])
    model(ids, labels=ids).loss.backward()
    params = list(model.projectors["image"].parameters())
    assert all(p.grad is not None and not p.grad.any() for p in params)


def test_projector_names_one_per_modality():
    model = model_with(CONTEXT)
    assert isinstance(model.projectors["image"], ContextGRU)
    assert isinstance(model.projectors["video"], torch.nn.Sequential)
    with pytest.raises(ValueError, match=r"missing \['video'\]"):
        model_with({"image": "context_gru"})
    with pytest.raises(ValueError, match=r"\['audio'\] are not continuous"):
        model_with({**CONTEXT, "audio": "linear"})  # audio is discrete here: it has no projector
    with pytest.raises(UnknownNameError, match="nope"):
        model_with({"image": "nope", "video": "linear"})


def test_a_sequential_head_cannot_read_back_through_a_context_projector():
    with pytest.raises(ValueError, match="heads.image is sequential"):
        model_with(CONTEXT, heads={"image": {"name": "gmm"}})
    model = model_with(CONTEXT, heads={"image": {"name": "gmm", "parallel": True}}, tokens_per_item={"image": 3})
    with pytest.raises(ValueError, match="heads.image is sequential"):
        model.replace_head("image", {"name": "regression", "options": SMALL_HEAD["regression"]})
    model_with(CONTEXT, heads={"video": {"name": "gmm"}})  # video's projector is token-wise: fine


def test_parallel_targets_do_not_enter_the_context_projector():
    """A parallel item's targets are outputs: changing them leaves the inputs' embeddings alone."""
    model = model_with(CONTEXT, heads={"image": {"name": "regression", "parallel": True}}, tokens_per_item={"image": 3})
    ids = image_sequence(model.layout)
    feats, targets = torch.randn(6, IMAGE_DIM), torch.tensor([False] * 3 + [True] * 3)
    changed = feats.clone()
    changed[3:] += 1
    with torch.no_grad():
        out, again = (model(ids, features={"image": f}, feature_targets={"image": targets}).logits for f in (feats, changed))
    assert torch.equal(out, again)


def test_projector_mapping_round_trips_through_save_and_load(tmp_path):
    model = model_with(CONTEXT)
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.projector == CONTEXT
    ids, feats = image_sequence(model.layout), torch.randn(6, IMAGE_DIM)
    with torch.no_grad():
        assert torch.equal(model.embed(ids, {"image": feats}), loaded.embed(ids, {"image": feats}))


def test_context_gru_rejects_lengths_that_do_not_split_the_rows():
    gru = ContextGRU(4, 8)
    with pytest.raises(ValueError, match="do not split 5"):
        gru(torch.randn(5, 4), [2, 2])
    with pytest.raises(ValueError, match="even LM hidden size"):
        ContextGRU(4, 7)
