"""The scorers against small examples worked out by hand."""

from __future__ import annotations

import shutil

import pytest

from mllm.eval import metrics
from mllm.eval.metrics import (
    caption_metrics,
    choice_letter,
    circular_accuracy,
    exact_match,
    mme_parse,
    mme_scores,
    normalize_transcript,
    pope_metrics,
    pope_parse,
    rotate_choices,
    vqa_accuracy,
    vqa_normalize,
    word_error_rate,
)


@pytest.mark.parametrize("raw, normalised", [
    ("Two dogs!", "2 dogs"),          # "!" touches no space: becomes a space; number word to digit
    ("yes, sir", "yes sir"),          # "," before a space is deleted
    ("1,000", "1000"),                # a digit-comma-digit: every mark deleted
    ("black/white", "black white"),   # "/" touches no space: a space
    ("3.5", "3.5"),                   # a period before a digit stays
    ("The end.", "end"),              # other periods go; articles go
    ("dont", "don't"),                # contractions are restored
    ("None", "0"),
    ("a\tcat\n", "cat"),
    ("it's", "it's"),                 # the apostrophe is not punctuation here
])
def test_vqa_normalisation_edge_cases(raw, normalised):
    assert vqa_normalize(raw) == normalised


def test_vqa_ten_annotator_accuracy():
    # 3 annotators said "2", 7 said "3"; the reply "two" is "2". Leaving out a "2" leaves 2 matches (2/3),
    # leaving out a "3" leaves 3 (1): (3 · 2/3 + 7 · 1) / 10 = 0.9.
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # One "cat" among nine "dog"s: leaving out the cat leaves 0 matches, each dog 1 (1/3): 9 · 1/3 / 10 = 0.3.
    assert vqa_accuracy("Cat.", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("bird", ["dog"] * 10) == 0.0


def test_mme_acc_plus_by_hand():
    rows = [("existence", "1", True), ("existence", "1", True),    # image 1: both right
            ("existence", "2", True), ("existence", "2", False),   # image 2: one wrong
            ("count", "3", False), ("count", "3", False),
            ("commonsense_reasoning", "4", True), ("commonsense_reasoning", "4", True)]
    got = mme_scores(rows)
    assert got["existence"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0, "n": 4}
    assert got["count"]["score"] == 0.0
    assert got["perception"] == {"score": 125.0, "subtasks": 2}
    assert got["cognition"] == {"score": 200.0, "subtasks": 1}


@pytest.mark.parametrize("reply, parsed", [
    ("Yes, there is.", "yes"), ("No.", "no"), ("y", "yes"), ("There is a dog", "other"),
    ("not sure", "no"),  # MME's parser looks for "no" in the first four characters
])
def test_mme_parser(reply, parsed):
    assert mme_parse(reply) == parsed


def test_circular_eval_by_hand():
    groups = {1: [True, True, True, True], 2: [True, False, True, True], 3: [True, True]}
    assert circular_accuracy(groups) == pytest.approx(2 / 3)
    assert rotate_choices(["a", "b", "c", "d"], answer=2, shift=1) == (["b", "c", "d", "a"], 1)
    assert rotate_choices(["a", "b", "c"], answer=0, shift=2) == (["c", "a", "b"], 1)


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("(C) a bird", "C"), ("The answer is B.", "B"),
    ("I think it is a dog", "B"),        # no letter: the one option whose text it contains
    ("A dog is in this picture", "B"),   # a bare "A" in a longer reply is the article
    ("cat or dog", None),                # two options' texts: undecided
])
def test_mmbench_choice_matching(reply, letter):
    assert choice_letter(reply, {"A": "cat", "B": "dog", "C": "bird"}) == letter


def test_pope_parser_and_metrics_by_hand():
    assert pope_parse("No, there is not.") == "no"
    assert pope_parse("Yes. There is no cat.") == "yes"  # only the first sentence counts
    assert pope_parse("I do not see one") == "no"
    # tp: 0, 4; fp: 1; tn: 2; fn: 3
    got = pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert got == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6})


def test_wer_is_normalised_and_corpus_level():
    assert normalize_transcript("Hello, World!  It's") == "hello world it's"
    assert normalize_transcript("'Hello,' she said. DON'T 'tis rock 'n' roll''") == "hello she said don't tis rock n roll"
    # 8 reference words; "the" before "mat" deleted; case and punctuation ignored.
    got = word_error_rate(["the cat sat on the mat", "hello world"], ["The cat sat on mat.", "hello, World!"])
    assert got["wer"] == pytest.approx(1 / 8) and got["deletions"] == 1 and got["reference_words"] == 8
    # one substitution and one insertion over 3 words
    assert word_error_rate(["a b c"], ["a x c d"])["wer"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="empty after normalisation"):
        word_error_rate(["..."], ["x"])


def test_exact_match_normalises():
    assert exact_match("The Dog.", "dog") and exact_match("Seven", "7") and exact_match("right", ["left", "Right"])
    assert not exact_match("dogs", "dog")


def test_caption_metrics_say_why_they_are_skipped_without_java(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    got = caption_metrics({"a": ["a dog barks"]}, {"a": "a dog barks"})
    assert set(got) == set(metrics.CAPTION_METRICS)
    assert all(v.startswith("skipped: no Java") for v in got.values())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")
def test_caption_metrics_with_java():
    refs = {"1": ["a dog barks loudly in the yard"], "2": ["rain falls on a tin roof"]}
    got = caption_metrics(refs, {"1": "a dog barks loudly in the yard", "2": "rain falls on a tin roof"})
    assert got["bleu_1"] == pytest.approx(1.0) and got["rouge_l"] == pytest.approx(1.0)
    assert got["meteor"] > 0.9
    worse = caption_metrics(refs, {"1": "a cat sleeps", "2": "rain falls on a tin roof"})
    assert worse["bleu_1"] < 1.0 and worse["cider"] < got["cider"]
