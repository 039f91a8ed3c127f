"""The standard scorers, as pure functions of predictions and references.

    vqa_normalize("Two dogs!")                     -> "2 dogs"
    vqa_accuracy("two", ["2"] * 3 + ["3"] * 7)     -> 0.9     (the 10-annotator formula)
    mme_scores(rows)                               -> per subtask acc, acc+ and score
    circular_accuracy({q: [True, False]})          -> 0.0     (MMBench CircularEval)
    pope_metrics(["yes", "no"], ["yes", "yes"])    -> accuracy, precision, recall, f1, yes_ratio
    word_error_rate(["the cat"], ["The cat."])     -> 0.0     (normalised, jiwer)
    caption_metrics(refs, hyps)                    -> BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap)

Each follows its benchmark's own evaluation code, quirks included, so the
numbers compare with published ones; the docstrings say where they differ.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

# ---- VQA (the official VQA evaluation's answer processing, as EvalAI and lmms-eval apply it) ------------

VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = ("a", "an", "the")
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern: a period not followed by a digit
_VQA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def vqa_process_punctuation(text: str) -> str:
    """A punctuation mark next to a space (or any mark, once the text has a digit-comma-digit) is
    deleted, else replaced by a space; then periods not followed by a digit are deleted."""
    out = text
    strip_all = _VQA_DIGIT_COMMA.search(text) is not None
    for p in VQA_PUNCTUATION:
        if p + " " in text or " " + p in text or strip_all:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official script passes re.UNICODE (32) where `count` goes: at most 32 periods are removed.
    return _VQA_PERIOD.sub("", out, count=re.UNICODE)


def vqa_process_digit_article(text: str) -> str:
    """Lower-case; number words zero..ten (and "none") to digits; articles dropped; contractions restored."""
    words = [VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(answer: str) -> str:
    """The VQA answer normalisation: whitespace, punctuation, then digits/articles/contractions."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: the mean, over each annotator left out in turn, of min(1, #matching others / 3).

    Prediction and answers are normalised alike (as EvalAI and lmms-eval do). The
    original script skips the normalisation when all annotators gave the same answer,
    so there "Two" would not match ten "2"s; here it does.
    """
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer")
    pred = vqa_normalize(prediction)
    refs = [vqa_normalize(a) for a in answers]
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1:]
        scores.append(min(1.0, sum(r == pred for r in others) / 3))
    return sum(scores) / len(scores)


# ---- exact match ----------------------------------------------------------------------------------------

_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation to spaces, every article ("a", "an", "the", anywhere) and extra spaces dropped,
    digit words zero..ten to digits: "The Dog." == "dog", "Seven" == "7", "a cat and a dog" == "cat and dog"."""
    words = [VQA_NUMBERS.get(w, w) for w in text.lower().translate(_PUNCT_TABLE).split()]
    words = [w for w in words if w not in VQA_ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, answer: str | Sequence[str]) -> bool:
    """Normalised exact match against one answer or any of several."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def accuracy(hits: Iterable[bool | float]) -> float:
    values = list(hits)
    if not values:
        raise ValueError("accuracy of no items")
    return sum(float(v) for v in values) / len(values)


# ---- yes/no (MME, POPE) ---------------------------------------------------------------------------------


def mme_parse(prediction: str) -> str:
    """MME's answer parser: "yes", "no" or "other" from the first four characters of the reply."""
    pred = prediction.lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        return pred
    if len(pred) == 1:
        return {"y": "yes", "n": "no"}.get(pred, "other")
    head = pred[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(rows: Iterable[tuple[str, str, bool]]) -> dict[str, dict[str, float]]:
    """(subtask, image, correct) rows -> per subtask: acc (per question), acc+ (per image, all of its
    questions right), score = 100·(acc + acc+); plus "perception" and "cognition": the sums of their
    subtasks' scores (the numbers MME's leaderboard reports)."""
    by_subtask: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for subtask, image, correct in rows:
        by_subtask[subtask][image].append(bool(correct))
    out: dict[str, dict[str, float]] = {}
    for subtask, images in sorted(by_subtask.items()):
        answers = [c for cs in images.values() for c in cs]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(cs) for cs in images.values()) / len(images)
        out[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus), "n": len(answers)}
    for group, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [out[n]["score"] for n in names if n in out]
        if present:
            out[group] = {"score": sum(present), "subtasks": len(present)}
    return out


def pope_parse(prediction: str) -> str:
    """POPE's parser: keep the first sentence; "no" if it has the word No, no or not, else "yes"."""
    text = prediction.split(".")[0] if "." in prediction else prediction
    words = text.replace(",", "").split(" ")
    return "no" if any(w in words for w in ("No", "not", "no")) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Parsed yes/no predictions against yes/no labels, "yes" being positive: accuracy, precision,
    recall, F1 and yes_ratio (the share of "yes" predictions; near 0.5 on POPE's balanced sets)."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"need as many predictions as labels (at least one), got {len(predictions)} and {len(labels)}")
    for x in (*predictions, *labels):
        if x not in ("yes", "no"):
            raise ValueError(f"POPE predictions and labels must be 'yes' or 'no', got {x!r}")
    tp = sum(p == "yes" and y == "yes" for p, y in zip(predictions, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(predictions, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(predictions, labels))
    fn = sum(p == "no" and y == "yes" for p, y in zip(predictions, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(labels), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / len(labels)}


# ---- multiple choice (MMBench, SEED-Bench) ----------------------------------------------------------------

LETTERS = string.ascii_uppercase


def choice_letter(prediction: str, choices: Mapping[str, str]) -> str | None:
    """The option letter a free-form reply names, or None (MMBench's rule-based matching, without its
    GPT fallback): a lone letter among the words ("B", "B.", "(B)", "B)" ...), else the one option whose
    text the reply contains."""
    words = prediction.split()
    letters = [c for c in choices]
    for prefix, suffix in (("", ""), ("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"),
                           ("(", ")."), (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")):
        found = [c for c in letters if prefix + c + suffix in words]
        if len(found) == 1 and not (prefix == suffix == "" and found == ["A"] and len(words) > 3):
            return found[0]  # a bare "A" in a longer reply may be the article
    lower = prediction.lower()
    found = [c for c, text in choices.items() if str(text).lower() in lower]
    return found[0] if len(found) == 1 else None


def circular_accuracy(groups: Mapping[object, Sequence[bool]]) -> float:
    """MMBench CircularEval: a question counts only if every rotation of its options was answered right."""
    if not groups:
        raise ValueError("CircularEval of no questions")
    return sum(all(passes) for passes in groups.values()) / len(groups)


def rotate_choices(choices: Sequence[str], answer: int, shift: int) -> tuple[list[str], int]:
    """The options rotated left by `shift` (MMBench's circular variants) and the answer's new index."""
    n = len(choices)
    return [choices[(i + shift) % n] for i in range(n)], (answer - shift) % n


# ---- speech recognition --------------------------------------------------------------------------------


def normalize_transcript(text: str) -> str:
    """Lower-case; every character but letters, digits and apostrophes within a word (don't) becomes a space, so
    quote marks go; spaces collapsed."""
    spaced = re.sub(r"[^\w']|_", " ", text.lower())
    return " ".join(re.sub(r"(?<!\w)'|'(?!\w)", " ", spaced).split())


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus WER over normalised transcripts (jiwer): errors over reference words, with the counts."""
    import jiwer

    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"need as many hypotheses as references (at least one), got {len(hypotheses)} and {len(references)}")
    refs = [normalize_transcript(r) for r in references]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise ValueError(f"reference {empty[0]} is empty after normalisation: {references[empty[0]]!r}")
    out = jiwer.process_words(refs, [normalize_transcript(h) for h in hypotheses])
    words = out.hits + out.substitutions + out.deletions
    return {"wer": out.wer, "substitutions": out.substitutions, "deletions": out.deletions,
            "insertions": out.insertions, "reference_words": words}


# ---- captioning ---------------------------------------------------------------------------------------------

NO_JAVA = "skipped: no Java (install a JRE, e.g. apt-get install default-jre-headless)"
NO_PYCOCOEVALCAP = "skipped: pycocoevalcap is not installed (pip install pycocoevalcap)"


def caption_metrics(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str]) -> dict[str, float | str]:
    """COCO caption metrics by pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE needs a download).

    Captions are tokenised by the PTB tokenizer and METEOR runs, both in Java. Without Java, or
    without pycocoevalcap, every metric is a "skipped: ..." string saying what is missing.
    """
    if set(references) != set(hypotheses) or not references:
        raise ValueError("need one hypothesis for each captioned item (and at least one item)")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        return dict.fromkeys(CAPTION_METRICS, NO_PYCOCOEVALCAP)
    if shutil.which("java") is None:
        return dict.fromkeys(CAPTION_METRICS, NO_JAVA)
    tokenizer = PTBTokenizer()
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its progress
        gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
        res = tokenizer.tokenize({k: [{"caption": hypotheses[k]}] for k in references})
        bleu, _ = Bleu(4).compute_score(gts, res)
        scores = {f"bleu_{i + 1}": float(b) for i, b in enumerate(bleu)}
        scores["meteor"] = float(Meteor().compute_score(gts, res)[0])
        scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return scores


CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
