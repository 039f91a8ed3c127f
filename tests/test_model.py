"""MultimodalLM on tiny Llama, Mistral and Qwen2 configs: splicing, slots, heads, exactness, save/load."""

from __future__ import annotations

import os
import subprocess
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mllm import checkpoint
from mllm.checkpoint import (
    HeadConfig,
    MediaConfig,
    ModelConfig,
    build_model,
    load_checkpoint,
    resolve_attn_implementation,
    save_checkpoint,
)
from mllm.heads import list_heads
from mllm.model import MultimodalLM
from mllm.model.modeling import block_causal_mask, query_blocks
from mllm.registry import UnknownNameError
from mllm.train.loop import enable_checkpointing
from mllm.vocab import ModalitySpec, VocabLayout
from tests.conftest import TINY_LMS

IMAGE_DIM, AUDIO_CODES, VIDEO_DIM = 12, 16, 4
SMALL_HEAD = {"gmm": {"width": 32, "num_components": 3}, "diffusion": {"width": 32, "depth": 1, "steps": 4},
              "regression": {"width": 32}}


def tiny_lm(arch: str, vocab_size: int = 300):
    torch.manual_seed(0)
    cfg = dict(TINY_LMS[arch], vocab_size=vocab_size)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def layout_for(text_vocab: int = 300, video: bool = False) -> VocabLayout:
    """image: continuous [N, 12]; audio: 16 discrete codes; with `video`, continuous [N, 4] too —
    ids laid out after the text vocabulary."""

    class Counter:  # the part of a HF tokenizer that VocabLayout.extend uses
        def __init__(self):
            self.vocab = {f"t{i}": i for i in range(text_vocab)}

        def __len__(self):
            return len(self.vocab)

        def get_vocab(self):
            return self.vocab

        def add_tokens(self, tokens, special_tokens):
            for t in tokens:
                self.vocab.setdefault(t.content, len(self.vocab))

        def convert_tokens_to_ids(self, tokens):
            return [self.vocab[t] for t in tokens]

    specs = [ModalitySpec("image", "continuous", feature_dim=IMAGE_DIM), ModalitySpec("audio", "discrete", codebook_size=AUDIO_CODES)]
    if video:
        specs.append(ModalitySpec("video", "continuous", feature_dim=VIDEO_DIM))
    return VocabLayout.extend(Counter(), specs)


def wrapped(arch: str) -> tuple[MultimodalLM, torch.nn.Module]:
    bare = tiny_lm(arch)
    reference = tiny_lm(arch)  # same seed, same weights, never resized
    return MultimodalLM.from_base(bare, layout_for()).eval(), reference


def with_heads(arch: str, heads: dict, tokens_per_item: dict | None = None) -> MultimodalLM:
    """A tiny model with image, audio and video tokens and the given output heads (small by default)."""
    heads = {m: {**spec, "options": {**SMALL_HEAD.get(spec["name"], {}), **spec.get("options", {})}} for m, spec in heads.items()}
    return MultimodalLM.from_base(tiny_lm(arch), layout_for(video=True), heads=heads, tokens_per_item=tokens_per_item).eval()


def image_sequence(layout: VocabLayout, n: int = 3) -> torch.Tensor:
    img = layout["image"]
    return torch.tensor([[5, 6, img.begin_id] + [img.placeholder_id] * n + [img.end_id, 7, 8, img.begin_id]
                         + [img.placeholder_id] * n + [img.end_id, 9]])


def test_no_media_logits_equal_bare_lm_exactly(arch):
    model, reference = wrapped(arch)
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert ours.shape[-1] == model.layout.vocab_size
    assert torch.equal(ours[..., :300], theirs)


def test_new_rows_start_at_the_mean_of_text_rows(arch):
    model, _ = wrapped(arch)
    emb = model.get_input_embeddings().weight
    new = torch.arange(300, model.layout.vocab_size)
    assert torch.allclose(emb[new], emb[:300].mean(0).expand(len(new), -1))


def test_features_are_spliced_at_placeholder_positions(arch):
    model, _ = wrapped(arch)
    ids = image_sequence(model.layout)
    feats = torch.randn(6, IMAGE_DIM)
    with torch.no_grad():
        embeds = model.embed(ids, {"image": feats})
        token_embeds = model.get_input_embeddings()(ids)
        projected = model.projectors["image"](feats)
    slots = (ids == model.layout["image"].placeholder_id)[0].nonzero().squeeze(-1)
    assert torch.equal(embeds[0, slots], projected)
    others = torch.ones(ids.shape[1], dtype=torch.bool)
    others[slots] = False
    assert torch.equal(embeds[0, others], token_embeds[0, others])


def test_slot_hidden_is_the_hidden_state_before_each_target(arch):
    model, _ = wrapped(arch)
    ids = image_sequence(model.layout)
    feats = torch.randn(6, IMAGE_DIM)
    targets = torch.tensor([False] * 3 + [True] * 3)  # only the second image is produced by the model
    with torch.no_grad():
        out = model(ids, features={"image": feats}, feature_targets={"image": targets})
        hidden = model.language_model(inputs_embeds=model.embed(ids, {"image": feats}), output_hidden_states=True).hidden_states[-1]
    slots = (ids == model.layout["image"].placeholder_id)[0].nonzero().squeeze(-1)[3:]
    assert torch.equal(out.slot_hidden["image"], hidden[0, slots - 1])
    assert torch.equal(out.slot_targets["image"], feats[3:])


def test_the_lm_keeps_no_hidden_states_but_the_last(arch):
    """Heads read only the last hidden state: asking the LM for output_hidden_states kept all L + 1 layers'."""
    model, _ = wrapped(arch)
    ids, feats = image_sequence(model.layout), {"image": torch.randn(6, IMAGE_DIM)}
    targets = {"image": torch.tensor([False] * 3 + [True] * 3)}
    asked = []
    with torch.no_grad():
        every = model.language_model(inputs_embeds=model.embed(ids, feats), output_hidden_states=True).hidden_states
        model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: asked.append(kwargs["output_hidden_states"]), with_kwargs=True)
        out = model(ids, features=feats, feature_targets=targets, output_hidden_states=True)
    assert asked == [False]
    assert torch.equal(out.last_hidden_state, every[-1])


def test_feature_count_mismatch_names_both_counts(arch):
    model, _ = wrapped(arch)
    ids = image_sequence(model.layout)
    with pytest.raises(ValueError, match=r"image: input_ids has 6 placeholder slots but 5 feature rows"):
        model(ids, features={"image": torch.randn(5, IMAGE_DIM)})
    with pytest.raises(ValueError, match=r"6 placeholder slots but 0 feature rows"):
        model(ids)
    with pytest.raises(ValueError, match=r"features must be \[n, 12\]"):
        model(ids, features={"image": torch.randn(6, IMAGE_DIM + 1)})
    with pytest.raises(ValueError, match="NaN"):
        model(ids, features={"image": torch.full((6, IMAGE_DIM), float("nan"))})
    with pytest.raises(ValueError, match="'audio', which is not a continuous modality"):
        model(ids, features={"image": torch.randn(6, IMAGE_DIM), "audio": torch.randn(1, 3)})


def test_discrete_codes_are_ordinary_tokens_with_a_loss(arch):
    model, _ = wrapped(arch)
    audio = model.layout["audio"]
    codes = torch.tensor([[5, audio.begin_id, audio.code_offset, audio.code_offset + AUDIO_CODES - 1, audio.end_id]])
    out = model(codes, labels=codes)
    assert out.loss.isfinite() and out.loss.requires_grad
    out.loss.backward()
    assert model.get_input_embeddings().weight.grad[audio.code_offset].abs().sum() > 0


def test_save_load_round_trip_is_bit_identical(arch, tmp_path, mistral_tokenizer_dir):
    model, processor = build_model(_model_config(arch, mistral_tokenizer_dir))
    messages = [
        {"role": "user", "content": [{"type": "image", "tokens": torch.rand(16, 48)}, {"type": "text", "text": "Say it."}]},
        {"role": "assistant", "content": [{"type": "audio", "tokens": [3, 1, 4]}, {"type": "image", "tokens": torch.rand(16, 48)}]},
    ]
    batch = processor([messages])
    model.eval()
    with torch.no_grad():
        before = model(**batch.model_inputs())
    save_checkpoint(model, processor, tmp_path / "ckpt")
    loaded, loaded_processor = load_checkpoint(tmp_path / "ckpt")
    again = loaded_processor([messages])
    assert torch.equal(again.input_ids, batch.input_ids) and torch.equal(again.labels, batch.labels)
    with torch.no_grad():
        after = loaded(**again.model_inputs())
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.loss, after.loss)
    assert torch.equal(before.slot_hidden["image"], after.slot_hidden["image"])
    # The plain HF Auto class loads it too, with no remote code.
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert isinstance(auto, MultimodalLM)
    assert not list((tmp_path).glob(".ckpt.tmp-*")), "temporary directory left behind"


def test_save_removes_what_killed_saves_left(tmp_path, mistral_tokenizer_dir):
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid whose process has exited: a save killed mid-way
    alive = subprocess.Popen(["sleep", "60"])  # a save still running
    try:
        for pid in (gone.pid, alive.pid):
            (tmp_path / f".ckpt.tmp-{pid}").mkdir()
            (tmp_path / f".ckpt.tmp-{pid}" / "model.safetensors").write_bytes(b"half")
        save_checkpoint(*build_model(_model_config("llama", mistral_tokenizer_dir)), tmp_path / "ckpt")
        assert sorted(p.name for p in tmp_path.glob(".ckpt.tmp-*")) == [f".ckpt.tmp-{alive.pid}"]
    finally:
        alive.kill()
        alive.wait()


def test_a_save_whose_swap_fails_keeps_the_earlier_checkpoint(tmp_path, mistral_tokenizer_dir, monkeypatch):
    model, processor = build_model(_model_config("llama", mistral_tokenizer_dir))
    save_checkpoint(model, processor, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    real = os.replace

    def swap_in_fails(src, dst):  # the new copy's rename into place, after the earlier one moved aside
        if ".ckpt.tmp-" in str(src) and str(dst) == str(tmp_path / "ckpt"):
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(os, "replace", swap_in_fails)
    torch.nn.init.normal_(model.get_input_embeddings().weight)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(model, processor, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _model_config(arch: str, tokenizer_dir) -> ModelConfig:
    return ModelConfig(
        base_config=dict(TINY_LMS[arch]),
        tokenizer=str(tokenizer_dir),
        chat_template="mistral",
        media={
            "image": MediaConfig(tokenizer="patch", options={"image_size": 16, "patch_size": 4}),
            "audio": MediaConfig(kind="discrete", codebook_size=AUDIO_CODES),
        },
    )


def test_pretrained_base_from_a_local_directory(tmp_path, mistral_tokenizer_dir):
    """Real-scale path: the base LM and tokenizer come from a local HF directory."""
    base = tiny_lm("llama", vocab_size=32000)
    base.save_pretrained(tmp_path / "base")
    for f in mistral_tokenizer_dir.iterdir():
        (tmp_path / "base" / f.name).write_bytes(f.read_bytes())
    model, _ = build_model(ModelConfig(base=str(tmp_path / "base"), media={"audio": MediaConfig(kind="discrete", codebook_size=8)}))
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits[..., :32000], base(ids).logits)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_implementations_agree(attn, tmp_path):
    model, _ = wrapped("llama")
    model.save_pretrained(tmp_path / "m")
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation=attn).eval()
    assert other.language_model.config._attn_implementation == attn
    ids = image_sequence(model.layout)
    feats = {"image": torch.randn(6, IMAGE_DIM)}
    with torch.no_grad():
        assert torch.allclose(model(ids, features=feats).logits, other(ids, features=feats).logits, atol=1e-5)


FLASH_REFUSED = r"attn_implementation='flash_attention_2' cannot serve the parallel head of image: its queries need a 4D"


def test_auto_attention_is_sdpa_with_a_parallel_head(monkeypatch, tmp_path, mistral_tokenizer_dir):
    """Flash attention reads the queries' 4D block-causal mask as a [B, T] padding mask and is always causal."""
    monkeypatch.setattr(checkpoint, "flash_attention_available", lambda: True)  # as on CUDA with flash-attn
    assert resolve_attn_implementation("auto") == resolve_attn_implementation("auto", []) == "flash_attention_2"
    assert resolve_attn_implementation("auto", ["image"]) == "sdpa"
    assert resolve_attn_implementation("eager", ["image"]) == "eager"
    with pytest.raises(ValueError, match=FLASH_REFUSED):
        resolve_attn_implementation("flash_attention_2", ["image"])
    cfg = _model_config("llama", mistral_tokenizer_dir)
    cfg.media["image"].tokens_per_item = 16
    cfg.heads = {"image": HeadConfig("regression", SMALL_HEAD["regression"], parallel=True)}
    model, processor = build_model(cfg)
    assert model.language_model.config._attn_implementation == "sdpa"
    save_checkpoint(model, processor, tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt")[0].language_model.config._attn_implementation == "sdpa"


def test_flash_attention_is_refused_with_a_parallel_head(tmp_path):
    """Where it is loaded, built, given a parallel head, or run with one: also when flash-attn is not installed,
    ahead of transformers' ImportError."""
    model = with_heads("llama", {"image": {"name": "regression", "parallel": True}}, tokens_per_item={"image": 3})
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=FLASH_REFUSED):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="flash_attention_2")
    flash = tiny_lm("llama")
    flash.config._attn_implementation = "flash_attention_2"  # as set_attn_implementation sets it where installed
    with pytest.raises(ValueError, match=FLASH_REFUSED):
        MultimodalLM.from_base(flash, layout_for(), heads={"image": {"name": "regression", "parallel": True}},
                               tokens_per_item={"image": 3})
    sequential = with_heads("llama", {"image": {"name": "gmm"}}, tokens_per_item={"image": 3})
    sequential.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=FLASH_REFUSED):
        sequential.replace_head("image", {"name": "gmm", "parallel": True})
    assert not sequential.is_parallel("image")
    model.language_model.config._attn_implementation = "flash_attention_2"
    ids, targets = image_sequence(model.layout), torch.tensor([False] * 3 + [True] * 3)
    with pytest.raises(ValueError, match=FLASH_REFUSED):
        model(ids, features={"image": torch.randn(6, IMAGE_DIM)}, feature_targets={"image": targets})


# ---- output heads -------------------------------------------------------------------------------


def test_forward_adds_the_weighted_head_loss(arch):
    model = with_heads(arch, {"image": {"name": "gmm", "loss_weight": 0.5}})
    ids = image_sequence(model.layout)
    feats, targets = torch.randn(6, IMAGE_DIM), torch.tensor([False] * 3 + [True] * 3)
    out = model(ids, labels=ids, features={"image": feats}, feature_targets={"image": targets})
    head_loss = model.heads["image"].loss(out.slot_hidden["image"], out.slot_targets["image"])
    assert torch.equal(out.head_losses["image"], head_loss)
    assert torch.allclose(out.loss, out.lm_loss + 0.5 * head_loss)
    out.loss.backward()
    assert model.heads["image"].net[0].weight.grad.abs().sum() > 0
    assert model.projectors["image"][0].weight.grad.abs().sum() > 0  # the input features are learned through too
    without_labels = model(ids, features={"image": feats}, feature_targets={"image": targets})
    assert without_labels.lm_loss is None and torch.allclose(without_labels.loss, 0.5 * without_labels.head_losses["image"])


def test_bf16_autocast_over_fp32_weights_trains_on_media():
    """Plain PyTorch bf16 training (the default on a GPU): the projectors answer in bf16, the embedding table in
    fp32, and splicing the two was a dtype error at the first batch with continuous features."""
    model = with_heads("llama", {"image": {"name": "gmm"}})
    ids = image_sequence(model.layout)
    feats, targets = torch.randn(6, IMAGE_DIM), torch.tensor([False] * 3 + [True] * 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, features={"image": feats}, feature_targets={"image": targets})
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.projectors["image"][0].weight.grad.abs().sum() > 0


def test_training_gives_unused_projectors_and_heads_a_zero_gradient(arch):
    """Under several ranks a text-only micro-batch still reaches every projector and head (ZeRO stays in lockstep)."""
    model = with_heads(arch, {"image": {"name": "gmm"}, "video": {"name": "diffusion"}})
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.eval()
    reference = model(ids, labels=ids).loss
    model.train().touch_idle_modules = True
    out = model(ids, labels=ids)
    assert torch.equal(out.loss, reference) and not out.head_losses
    out.loss.backward()
    unused = [p for part in (model.projectors, model.heads) for p in part.parameters()]
    assert unused and all(p.grad is not None and not p.grad.any() for p in unused)


def test_parallel_targets_are_queries_that_see_their_whole_span():
    model = with_heads("llama", {"image": {"name": "regression", "parallel": True}}, tokens_per_item={"image": 3})
    ids = image_sequence(model.layout)
    slots = (ids == model.layout["image"].placeholder_id)[0].nonzero().squeeze(-1)
    feats, targets = torch.randn(6, IMAGE_DIM), torch.tensor([False] * 3 + [True] * 3)
    with torch.no_grad():
        out = model(ids, features={"image": feats}, feature_targets={"image": targets}, output_hidden_states=True)
        changed_targets = feats.clone()
        changed_targets[3:] += 1
        again = model(ids, features={"image": changed_targets}, feature_targets={"image": targets})
        changed_inputs = feats.clone()
        changed_inputs[:3] += 1
        third = model(ids, features={"image": changed_inputs}, feature_targets={"image": targets})
        causal = model(ids, features={"image": feats})  # every slot an input: plain causal attention
    assert torch.equal(out.logits, again.logits), "target features of a parallel span must not enter as inputs"
    assert not torch.allclose(out.logits, third.logits), "input features are still spliced"
    assert torch.equal(out.slot_hidden["image"], out.last_hidden_state[0, slots[3:]])  # each slot predicts itself
    assert torch.equal(out.slot_targets["image"], feats[3:])
    # The first query already sees the later ones, so the logits before the second query differ from causal ones.
    assert not torch.allclose(out.logits[0, slots[3]], causal.logits[0, slots[3]])


@pytest.mark.parametrize("parallel", [False, True])
def test_target_flags_are_checked_before_the_lm_runs(parallel):
    """Bool flags, one per slot and per feature row, in both modes alike: 0/1 integers picked rows 0 and 1 as
    targets, and a wrong count gave a cryptic error in parallel mode, in sequential mode only after the LM ran."""
    model = with_heads("llama", {"image": {"name": "regression", "parallel": parallel}}, tokens_per_item={"image": 3})
    calls = []
    model.language_model.register_forward_pre_hook(lambda module, args: calls.append(module))
    ids, feats = image_sequence(model.layout), {"image": torch.randn(6, IMAGE_DIM)}  # 6 image slots
    with pytest.raises(ValueError, match=r"image: 5 target flags for 6 placeholder slots"):
        model(ids, features=feats, feature_targets={"image": torch.tensor([False, False, True, True, True])})
    with pytest.raises(ValueError, match=r"image: feature_targets must be a 1-D bool mask, got torch.int64 \(6,\)"):
        model(ids, features=feats, feature_targets={"image": torch.tensor([0, 0, 0, 1, 1, 1])})
    with pytest.raises(ValueError, match=r"image: 6 target flags for 0 feature rows"):
        model(ids, feature_targets={"image": torch.ones(6, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"feature_targets for 'audio', which is not a continuous modality"):
        model(ids, features=feats, feature_targets={"audio": torch.ones(6, dtype=torch.bool)})
    assert not calls


def test_block_causal_mask():
    padding = torch.tensor([[0, 1, 1, 1, 1, 1]])
    queries = torch.tensor([[False, False, True, True, False, True]])
    blocks = query_blocks(queries)
    assert blocks.tolist() == [[0, 0, 1, 1, 0, 2]]
    allowed = block_causal_mask(padding, blocks, 6, torch.float32)[0, 0] == 0
    assert allowed.tolist() == [
        [False, False, False, False, False, False],
        [False, True, False, False, False, False],
        [False, True, True, True, False, False],  # query 2 sees query 3 of its block
        [False, True, True, True, False, False],
        [False, True, True, True, True, False],
        [False, True, True, True, True, True],
    ]
    last_two = block_causal_mask(padding, blocks, 2, torch.float32)[0, 0] == 0
    assert torch.equal(last_two, allowed[-2:])


def test_heads_keep_their_own_initialisation():
    """HF's generic initialiser must not replace a head's own (transformers 5 skips parameterless modules)."""
    model = with_heads("llama", {"image": {"name": "diffusion"}, "video": {"name": "gmm"}})
    final = model.heads["image"].net.final.linear
    assert not final.weight.any() and not final.bias.any()  # MAR's zero-initialised output layer
    first = model.heads["video"].net[0].weight
    assert abs(first.std().item() - (2 / sum(first.shape)) ** 0.5) < 0.02  # Xavier, not N(0, 0.02)


def test_head_config_errors():
    with pytest.raises(ValueError, match="audio is discrete"):
        with_heads("llama", {"audio": {"name": "gmm"}})
    with pytest.raises(ValueError, match="'hidden_size' comes from the model"):
        with_heads("llama", {"image": {"name": "gmm", "options": {"hidden_size": 8}}})
    with pytest.raises(UnknownNameError, match="unknown head 'vae' .*diffusion, gmm, regression"):
        with_heads("llama", {"image": {"name": "vae"}})
    with pytest.raises(ValueError, match="heads.image: expected keys"):
        with_heads("llama", {"image": {"name": "gmm", "weight": 2}})
    with pytest.raises(ValueError, match="tokens_per_item.image must be >= 0"):
        with_heads("llama", {}, tokens_per_item={"image": -1})
    with pytest.raises(ValueError, match="heads.video: no such modality"):
        ModelConfig(base_config={}, tokenizer="x", heads={"video": HeadConfig("gmm")})


@pytest.mark.parametrize("head", list_heads())
def test_save_load_with_each_head_is_bit_identical(head, tmp_path, mistral_tokenizer_dir):
    cfg = _model_config("llama", mistral_tokenizer_dir)
    cfg.media["image"].tokens_per_item = 16
    cfg.heads = {"image": HeadConfig(head, SMALL_HEAD[head], loss_weight=0.25)}
    model, processor = build_model(cfg)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Draw it."}]},
        {"role": "assistant", "content": [{"type": "image", "tokens": torch.rand(16, 48)}]},
    ]
    batch = processor([messages])
    model.eval()
    with torch.no_grad():
        torch.manual_seed(0)  # the diffusion loss draws noise and times
        before = model(**batch.model_inputs())
    save_checkpoint(model, processor, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config.heads == model.config.heads and loaded.config.tokens_per_item == {"image": 16}
    state, loaded_state = model.heads.state_dict(), loaded.heads.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    with torch.no_grad():
        torch.manual_seed(0)
        after = loaded(**batch.model_inputs())
        hidden = before.slot_hidden["image"]
        samples = [m.heads["image"].sample(hidden, generator=torch.Generator().manual_seed(1)) for m in (model, loaded)]
    assert torch.equal(before.loss, after.loss) and torch.equal(before.head_losses["image"], after.head_losses["image"])
    assert torch.equal(samples[0], samples[1])
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert isinstance(auto, MultimodalLM) and auto.heads["image"].name == head


def test_the_queries_gradient_is_the_same_every_time():
    """Many spans read the same query rows; their gradients must add up in a fixed order, or two runs of one
    seeded recipe drift apart (indexing the table did so on a CPU: its backward adds with parallel atomics)."""
    model = with_heads("llama", {"image": {"name": "regression", "parallel": True}}, tokens_per_item={"image": 3})
    ids = image_sequence(model.layout).repeat(2048, 1)  # 4096 spans
    slots = ids == model.layout["image"].placeholder_id
    upstream = torch.randn(*ids.shape, model.config.text_config.hidden_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(10):
            model.zero_grad()
            (model.embed(ids, queries=slots) * upstream).sum().backward()
            grads.append(model.queries["image"].grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_parallel_slots_are_learned_queries_one_per_slot(tmp_path):
    """Each query slot of a parallel span gets its own learned embedding (SEED-X's output queries): the same
    placeholder at slots k and k' enters as different vectors, every span restarts at query 0, the queries
    are saved with the model, and a model with a parallel head must know its N."""
    model = with_heads("llama", {"image": {"name": "regression", "parallel": True}}, tokens_per_item={"image": 3})
    ids = image_sequence(model.layout)  # two 3-slot spans
    slots = ids == model.layout["image"].placeholder_id
    embeds = model.embed(ids, queries=slots)[slots]  # [6, H]
    plain = model.get_input_embeddings()(ids)[slots]
    torch.testing.assert_close(embeds - plain, model.queries["image"].detach().repeat(2, 1))
    assert not torch.allclose(embeds[0], embeds[1])
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "m").queries["image"], model.queries["image"])
    with pytest.raises(ValueError, match="longer than its 2 query slots"):
        with_heads("llama", {"image": {"name": "regression", "parallel": True}}, tokens_per_item={"image": 2}).embed(
            ids, queries=slots)
    with pytest.raises(ValueError, match="heads.image is parallel: tokens_per_item.image must give"):
        with_heads("llama", {"image": {"name": "regression", "parallel": True}})


def test_replacing_a_head_with_a_parallel_one_adds_its_queries_and_keeps_them_for_the_next():
    model = with_heads("llama", {"image": {"name": "gmm"}}, tokens_per_item={"image": 3})
    assert "image" not in model.queries
    model.replace_head("image", {"name": "regression", "parallel": True})
    queries = model.queries["image"]
    assert queries.shape == (3, model.config.text_config.hidden_size) and model.is_parallel("image")
    model.replace_head("image", {"name": "gmm", "parallel": True})  # a new head on the same queries
    assert model.queries["image"] is queries and model.config.heads["image"]["loss_weight"] == 1.0
    model.replace_head("image", {"name": "gmm"})
    assert "image" not in model.queries and not model.is_parallel("image")


def test_a_refused_replacement_leaves_the_head_and_config_as_they_were():
    """A parallel head without tokens_per_item was refused only after the new head and its config entry were in:
    the model was left calling itself parallel, with no queries."""
    model = with_heads("llama", {"image": {"name": "gmm"}})
    head, spec = model.heads["image"], dict(model.config.heads["image"])
    with pytest.raises(ValueError, match="heads.image is parallel: tokens_per_item.image must give its N query slots"):
        model.replace_head("image", {"name": "regression", "parallel": True})
    assert model.heads["image"] is head and model.config.heads["image"] == spec and not model.is_parallel("image")


def test_a_replaced_head_and_its_queries_take_the_models_dtype_and_device():
    """They were built in fp32 on the host whatever the model's dtype and device: a bf16 model could not run them."""
    model = with_heads("llama", {"image": {"name": "gmm"}}, tokens_per_item={"image": 3}).to(torch.bfloat16)
    model.replace_head("image", {"name": "regression", "parallel": True})
    assert {p.dtype for p in model.heads["image"].parameters()} == {torch.bfloat16}
    assert model.queries["image"].dtype == torch.bfloat16
    ids, targets = image_sequence(model.layout), torch.tensor([False] * 3 + [True] * 3)
    with torch.no_grad():
        out = model(ids, features={"image": torch.randn(6, IMAGE_DIM)}, feature_targets={"image": targets}, labels=ids)
    assert out.loss.dtype == torch.float32 and out.loss.isfinite()
    moved = with_heads("llama", {"image": {"name": "gmm"}}, tokens_per_item={"image": 3}).to("meta")  # any device
    moved.replace_head("image", {"name": "diffusion", "parallel": True})
    assert {p.device.type for p in moved.heads["image"].parameters()} == {"meta"} and moved.queries["image"].is_meta


def test_a_model_wrapped_around_a_bf16_lm_is_bf16_throughout():
    """from_base built projectors and heads in fp32 beside a bf16 LM (from_base(dir, dtype=torch.bfloat16), or a
    bf16 model): its first media input died in the projector's matmul."""
    lm = tiny_lm("llama").to(torch.bfloat16)
    model = MultimodalLM.from_base(lm, layout_for(), heads={"image": {"name": "gmm", "options": SMALL_HEAD["gmm"]}},
                                   tokens_per_item={"image": 3}).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, targets = image_sequence(model.layout), torch.tensor([False] * 3 + [True] * 3)
    with torch.no_grad():
        out = model(ids, features={"image": torch.randn(6, IMAGE_DIM)}, feature_targets={"image": targets}, labels=ids)
    assert out.loss.isfinite()


def test_activation_checkpointing_recomputes_layers_with_the_same_gradients_and_no_deprecation(arch):
    def gradients(checkpointed: bool) -> dict[str, torch.Tensor]:
        model, _ = wrapped(arch)
        model.train()
        if checkpointed:
            with warnings.catch_warnings():
                warnings.simplefilter("error", FutureWarning)  # not transformers' deprecated gradient_* names
                enable_checkpointing(model)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointed
        ids = image_sequence(model.layout)
        torch.manual_seed(0)  # the same dropout masks in both runs; checkpointing replays them
        model(ids, features={"image": torch.randn(6, IMAGE_DIM)}, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
