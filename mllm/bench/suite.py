"""Run the sections, then write results.json and results.md (see report.py).

    mllm bench [--quick] [--only SECTION ...] [--out bench] [--data CORPORA] [--model CHECKPOINT]
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from mllm.bench.options import SECTIONS, add_arguments
from mllm.bench.report import Results, markdown
from mllm.bench.settings import Settings
from mllm.data.sources import cache_dir

def cpu_name() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_suite(s: Settings, sections: list[str]) -> Results:
    """Each section in turn; one that fails is reported in meta.errors and the others still run."""
    results = Results(meta={
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": cpu_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "load": load(), "quick": s.quick,
        "repeats": s.repeats, "sections": {}, "errors": {},
    })
    start = time.perf_counter()
    for name in sections:
        began = time.perf_counter()
        print(f"bench: {name} ...", flush=True)
        try:
            results.figures += importlib.import_module(f"mllm.bench.{name}").run(s)
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others' figures
            traceback.print_exc()
            results.meta["errors"][name] = f"{type(e).__name__}: {e}"
        results.meta["sections"][name] = round(time.perf_counter() - began, 1)
        print(f"bench: {name} done in {results.meta['sections'][name]:.0f} s", flush=True)
    results.meta["wall_s"] = round(time.perf_counter() - start, 1)
    results.meta["load_end"] = load()
    return results


def run_from_args(args: argparse.Namespace) -> int:
    repeats = args.repeats or (3 if args.quick else 5)
    args.out.mkdir(parents=True, exist_ok=True)  # now: results are written only once every section has run
    with tempfile.TemporaryDirectory(prefix="mllm-bench-") as tmp:
        data = args.data or cache_dir() / "corpora"
        s = Settings(quick=args.quick, repeats=repeats, data=data, model=args.model, work=args.work or Path(tmp))
        results = run_suite(s, list(dict.fromkeys(args.only or SECTIONS)))  # a section named twice runs once
    json_path, md_path = results.write(args.out)
    print(markdown(results))
    print(f"bench: {json_path}, {md_path}")
    return 1 if results.meta["errors"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mllm.bench", description=__doc__.splitlines()[0])
    return run_from_args(add_arguments(parser).parse_args(argv))
