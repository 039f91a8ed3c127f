"""CTC of transcribed input media: the pure loss, the processor's targets, the loader, the model's term, the loop,
and reading the slots back (prefix beam search, a sequence's likelihood)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mllm.data.cache import TokenCache
from mllm.data.input_augment import InputAugment
from mllm.data.loader import MultimodalLoader
from mllm.data.packing import pack_collate
from mllm.data.records import read_records
from mllm.generation import ctc_log_likelihood, ctc_prefix_beam_search
from mllm.losses import ctc_loss
from mllm.model import MultimodalLM
from mllm.model.modeling import item_lengths
from mllm.processor import MessageError, Processor
from mllm.train import finetune, load_recipe
from tests.finetune_setup import corpus, recipe, text_tokenizer, write  # noqa: F401  (corpus, text_tokenizer: fixtures)
from tests.test_input_augment import VOICES, processor  # noqa: F401  (processor: a fixture)
from tests.test_input_augment import corpus as spoken  # noqa: F401  (a fixture)
from tests.test_model import IMAGE_DIM, image_sequence, layout_for, tiny_lm


def one_hot_path(classes: list[int], size: int = 6) -> torch.Tensor:
    """Logits [1, T, size] that put almost all mass on one class per step."""
    return torch.nn.functional.one_hot(torch.tensor([classes]), size).float() * 20


def test_ctc_loss_is_near_zero_on_a_right_path_and_large_on_a_wrong_one():
    targets, lengths = torch.tensor([3, 3, 4]), torch.tensor([3])
    right = ctc_loss(one_hot_path([3, 0, 3, 4, 0]), torch.tensor([5]), targets, lengths)  # blank parts the two 3s
    merged = ctc_loss(one_hot_path([3, 3, 4, 4, 0]), torch.tensor([5]), targets, lengths)  # reads "3 4"
    assert right < 1e-3 < 10 < merged


def words(processor: Processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_processor_gives_one_transcript_per_item_and_only_when_asked(processor, spoken):
    [question, answer] = [json.loads(line) for line in spoken.read_text().splitlines()]
    asked = processor.encode(question["messages"], base_dir=spoken.parent, transcripts=True)
    assert [t.tolist() for t in asked.transcripts["audio"]] == [words(processor, "two")]
    answered = processor.encode(answer["messages"], base_dir=spoken.parent, transcripts=True)
    assert [t.numel() for t in answered.transcripts["audio"]] == [0]  # a head's target is no input to transcribe
    assert processor.encode(question["messages"], base_dir=spoken.parent).transcripts == {}


@pytest.mark.parametrize("transcript, match", [
    ("", "'transcript' must be non-empty text"),
    (42, "'transcript' must be non-empty text"),
    ("one two " * 20, r"messages\[0\].content\[0\]: its transcript needs \d+ slots .* but the audio has 20 tokens"),
])
def test_a_bad_or_overlong_transcript_names_its_part(processor, spoken, transcript, match):
    messages = [{"role": "user", "content": [{"type": "audio", "path": str(spoken.parent / "media" / "q.wav"),
                                              "transcript": transcript}]}]
    with pytest.raises(MessageError, match=match):
        processor.encode(messages, transcripts=True)


def test_the_cache_and_the_augmentation_keep_the_transcript(processor, spoken, tmp_path):
    cache = TokenCache(tmp_path / "cache", processor.media_tokenizers)
    cache.encode_records(read_records(spoken, streaming=True), progress=False)
    for augment in (None, InputAugment(VOICES, processor, seed=0)):
        loader = MultimodalLoader(read_records(spoken, streaming=True), processor, max_length=256, batch_size=2,
                                  cache=cache, augment=augment, policy="fail", transcripts=True)
        [batch] = list(loader)
        assert [t.tolist() for t in batch.transcripts["audio"]] in (  # packing may put either record first
            [words(processor, "two"), []], [[], words(processor, "two")])
        assert "transcripts" in batch.model_inputs()
    plain = MultimodalLoader(read_records(spoken, streaming=True), processor, max_length=256, batch_size=2, cache=cache)
    assert "transcripts" not in next(iter(plain)).model_inputs()


def test_packed_rows_keep_transcripts_in_reading_order(processor, spoken):
    [question, answer] = [json.loads(line) for line in spoken.read_text().splitlines()]
    samples = [processor.encode(r["messages"], base_dir=spoken.parent, transcripts=True) for r in (answer, question)]
    batch = pack_collate(samples, max_length=256, pad_id=processor.pad_id)
    items = item_lengths(batch.input_ids == processor.layout["audio"].placeholder_id)  # reading order
    said = {n: t.numel() for n, t in zip(items, batch.transcripts["audio"])}
    assert said == {20: len(words(processor, "two")), 10: 0}  # the 0.8 s question, the 0.4 s answer


def greedy(logits: torch.Tensor, blank: int) -> list[int]:
    best = logits.argmax(-1).tolist()
    return [k for i, k in enumerate(best) if k != blank and (i == 0 or k != best[i - 1])]


def test_the_model_learns_to_spell_each_item_at_its_slots():
    torch.manual_seed(0)
    model = MultimodalLM.from_base(tiny_lm("llama"), layout_for()).train()
    ids, feats = image_sequence(model.layout, n=5), torch.randn(10, IMAGE_DIM)
    said = {"image": [torch.tensor([11, 12, 12]), torch.tensor([], dtype=torch.long)]}  # the second image says nothing
    assert model(ids, features={"image": feats}).transcript_loss is None
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = model(ids, features={"image": feats}, transcripts=said).transcript_loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first
    with torch.no_grad():
        logits = model(ids, features={"image": feats}).logits[0, 3:8]  # the first image's five slots
    blank = model.layout["image"].placeholder_id
    assert greedy(logits, blank) == [11, 12, 12]
    assert ctc_prefix_beam_search(logits.log_softmax(-1), blank)[0][0] == [11, 12, 12]


def test_an_unpruned_prefix_search_gives_every_sequence_its_exact_likelihood():
    torch.manual_seed(0)
    log_probs = torch.randn(5, 4).mul(2).log_softmax(-1)  # [T, V], blank 0
    every = ctc_prefix_beam_search(log_probs, blank=0, beam=10_000, top_k=4)
    assert sum(torch.tensor(score).exp() for _, score in every) == pytest.approx(1.0, abs=1e-6)
    for ids, score in every:
        assert score == pytest.approx(ctc_log_likelihood(log_probs, ids, blank=0), abs=1e-4)
    scores = [score for _, score in every]
    assert scores == sorted(scores, reverse=True)
    assert ctc_log_likelihood(log_probs, [1, 1, 1], blank=0) > ctc_log_likelihood(log_probs, [1] * 6, blank=0)
    assert ctc_log_likelihood(log_probs, [1] * 6, blank=0) == float("-inf")  # needs 6 steps, and a blank between each


def test_a_pruned_search_keeps_its_beam_and_bad_arguments_are_refused():
    log_probs = torch.randn(6, 5).log_softmax(-1)
    assert len(ctc_prefix_beam_search(log_probs, blank=0, beam=3, top_k=2)) == 3
    with pytest.raises(ValueError, match="blank in"):
        ctc_prefix_beam_search(log_probs, blank=5)
    with pytest.raises(ValueError, match="beam and top_k"):
        ctc_prefix_beam_search(log_probs, blank=0, beam=0)


def test_transcript_count_and_missing_logits_are_errors():
    model = MultimodalLM.from_base(tiny_lm("llama"), layout_for())
    ids, feats = image_sequence(model.layout), torch.randn(6, IMAGE_DIM)
    with pytest.raises(ValueError, match="image: 1 transcripts for 2 items"):
        model(ids, features={"image": feats}, transcripts={"image": [torch.tensor([4])]})
    with pytest.raises(ValueError, match="logits_to_keep=0"):
        model(ids, features={"image": feats}, transcripts={"image": [torch.tensor([4])] * 2}, logits_to_keep=1)
    with pytest.raises(ValueError, match="'audio', which is not a continuous modality"):
        model(ids, features={"image": feats}, transcripts={"audio": [torch.tensor([4])]})


def test_transcribed_names_continuous_modalities_only():
    config = MultimodalLM.from_base(tiny_lm("llama"), layout_for()).config
    config.transcribed = ["audio"]
    with pytest.raises(ValueError, match=r"transcribed: \['audio'\] are not continuous modalities of this model"):
        MultimodalLM(config)


@pytest.fixture(scope="module")
def said(corpus) -> Path:
    """test_finetune's colour questions, each picture's part saying its colour."""
    rows = [json.loads(line) for line in (corpus / "understand.jsonl").read_text().splitlines()]
    for r in rows:
        r["messages"][0]["content"][0]["transcript"] = r["messages"][1]["content"][0]["text"].split()[-1].strip(".")
    (corpus / "said.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return corpus


def test_the_loop_adds_the_weighted_term_and_logs_it(said, text_tokenizer, tmp_path):
    for weight in (0.0, 0.5):
        out = tmp_path / f"w{weight}"
        cfg = load_recipe(write(tmp_path, recipe(said, text_tokenizer, out, data={"train": ["said.jsonl"]},
                                                 loss={"transcripts": weight},
                                                 train={"max_steps": 2, "save_every": 0, "export": "merged"})))
        finetune(cfg)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(("transcript_loss" in r) == (weight > 0) for r in rows)
        config = json.loads((out / "final" / "config.json").read_text())
        assert config["transcribed"] == (["image"] if weight > 0 else [])
        if weight:
            assert all(0 < r["transcript_loss"] < r["loss"] for r in rows)
