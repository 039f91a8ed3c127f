"""English text for pretraining the tiny base LM.

Two parts, in `OUT/text/<split>.jsonl` as `{"id", "corpus": "text", "text", "meta"}`:
- WordNet 3.0 glosses (Debian `wordnet-base`): one line per synset, e.g.
  `sedate, calm, tranquilize (verb): cause to be calm or quiet ... For example: "..."`.
  Each synset belongs to one split by a stable hash of its offset.
- The captions, questions and answers of the corpora built before this one,
  split for split (train text only from train records), deduplicated. The
  eval-only corpora are never read.

Why WordNet: short, clean, definitional English covering ~117k concepts with
example sentences, under a permissive licence, in a 28 MB package with no
dependencies (GCIDE is GPL and needs dictd; fortunes are small and mixed in
register; the Python docs are HTML and off-domain).
"""

from __future__ import annotations

import json
from pathlib import Path

from mllm.data import sources
from mllm.data.corpora import SPLITS, BuildContext, CorpusResult, register_corpus, split_by_hash
from mllm.errors import InputError

POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def parse_wordnet_line(line: str) -> tuple[str, str, str] | None:
    """(key, pos name, rendered text) of one `data.*` line, or None for the licence header."""
    if line.startswith(" ") or "|" not in line:
        return None
    head, _, gloss = line.partition("|")
    fields = head.split()
    offset, pos, w_cnt = fields[0], fields[2], int(fields[3], 16)
    words = []
    for i in range(w_cnt):
        w = fields[4 + 2 * i].replace("_", " ")
        if w.endswith(("(a)", "(p)", "(ip)")):
            w = w[: w.rindex("(")]
        if w not in words:
            words.append(w)
    parts = [p.strip() for p in gloss.strip().split(";") if p.strip()]
    definition = "; ".join(p for p in parts if not p.startswith('"'))
    examples = [p for p in parts if p.startswith('"') and p.endswith('"') and len(p) > 2]
    pos_name = POS.get(pos, pos)
    text = f"{', '.join(words)} ({pos_name}): {definition}".rstrip()
    if not text.endswith("."):
        text += "."
    if examples:
        text += " For example: " + "; ".join(examples) + "."
    return f"{pos}{offset}", pos_name, text


def wordnet_entries(root: Path | None = None) -> list[tuple[str, str, str]]:
    root = root or sources.wordnet_dir()
    out = []
    for name in sources.WORDNET_FILES:
        with open(root / name, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                try:
                    entry = parse_wordnet_line(line)
                except (IndexError, ValueError) as e:  # too few fields, or a word count that is not hex
                    raise InputError(f"{root / name}:{n}: not a WordNet data line ({type(e).__name__}: {e}); "
                                     "reinstall the wordnet-base package (bash data/install_sources.sh)") from None
                if entry is not None:
                    out.append(entry)
    return out


def record_texts(rec: dict) -> str | None:
    """The text of a record's turns, one line per text part, or None when it has none."""
    lines = []
    for msg in rec.get("messages", []):
        for part in msg.get("content", []):
            if part.get("type") == "text" and part.get("text", "").strip():
                lines.append(part["text"].strip())
    return "\n".join(lines) if lines else None


@register_corpus("text")
def build(ctx: BuildContext) -> CorpusResult:
    cfg = ctx.cfg.text
    info = sources.source_info("wordnet")
    entries = wordnet_entries()
    if cfg.max_glosses is not None and cfg.max_glosses < len(entries):
        step = len(entries) / cfg.max_glosses
        entries = [entries[int(i * step)] for i in range(cfg.max_glosses)]
    by_split = {s: [] for s in SPLITS}
    for e in entries:
        by_split[split_by_hash(e[0], cfg.fractions, salt="wordnet")].append(e)
    by_split = {s: v[: ctx.cap(len(v))] for s, v in by_split.items()}

    corpus_lines: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    used_corpora = []
    if cfg.corpus_text:
        for name in _built_corpora(ctx.root):
            used_corpora.append(name)
            for split in SPLITS:
                seen = {t for _, t in corpus_lines[split]}
                p = ctx.root / name / f"{split}.jsonl"
                if not p.is_file():
                    continue
                for line in p.read_text(encoding="utf-8").splitlines():
                    t = record_texts(json.loads(line))
                    if t and t not in seen:
                        seen.add(t)
                        corpus_lines[split].append((name, t))

    out = ctx.output("text")
    bar = ctx.bar(sum(len(v) for v in by_split.values()), "text")
    with out:
        for split in SPLITS:
            for key, pos, t in by_split[split]:
                out.add_text(split, t, {"source": "wordnet", "synset": key, "pos": pos})
                bar.update(1)
            for name, t in corpus_lines[split]:
                out.add_text(split, t, {"source": f"corpus:{name}"})
    bar.close()
    return CorpusResult(
        name="text", sources=[info], counts=dict(out.counts),
        extra={
            "wordnet_glosses": {s: len(v) for s, v in by_split.items()},
            "corpus_lines": {s: len(v) for s, v in corpus_lines.items()},
            "from_corpora": used_corpora,
        },
    )


def _built_corpora(root: Path) -> list[str]:
    """Corpora already written under `root`, in build order, without eval-only ones and text itself."""
    from mllm.data.corpora import list_corpora

    eval_only = {"spoken_numbers"}
    return [n for n in list_corpora() if n not in eval_only and n != "text" and (root / n).is_dir()]
