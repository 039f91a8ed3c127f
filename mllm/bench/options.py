"""The suite's command-line options; light to import, so `mllm --help` stays instant.

Each option is checked as it is parsed, so a wrong one stops the command before any section
runs (a run takes minutes, and its results are written only at the end).
"""

from __future__ import annotations

import argparse
from pathlib import Path

SECTIONS = ("machine", "training", "packing", "cache", "generation", "tokenizers", "memory", "scale")


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def folder(text: str) -> Path:
    """A folder that may not exist yet, but not a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    return path


def corpora(text: str) -> Path:
    """Built corpora this mllm can read."""
    from mllm.data.corpora.build import CorporaError, check_corpora

    path = Path(text)
    try:
        check_corpora(path)
    except CorporaError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def checkpoint(text: str) -> Path:
    path = Path(text)
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{path}: not a checkpoint directory (no config.json)")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats: ≤ 15 minutes on 2 cores")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None, metavar="SECTION",
                        help=f"run only these sections ({', '.join(SECTIONS)})")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed rounds per alternation (default 3 quick, 5)")
    parser.add_argument("--out", type=folder, default=Path("bench"), help="where results.json and results.md go")
    parser.add_argument("--data", type=corpora, default=None,
                        help="built corpora (default: $MLLM_CACHE/corpora if built, else data/build_small.yaml)")
    parser.add_argument("--model", type=checkpoint, default=None,
                        help="a Pipeline checkpoint for the memory section (default: the stand-in, see standin.py)")
    parser.add_argument("--work", type=folder, default=None, help="scratch folder to keep (default: a temporary one)")
    return parser
