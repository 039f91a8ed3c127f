"""Memory: peak RSS of training, generation and serving a model, each in a fresh process.

    python -m mllm.bench.memory STAGE CHECKPOINT CORPORA     # prints {"floor_mib": ..., "peak_rss_mib": ...}

The model is a Pipeline checkpoint: `--model DIR`, or the stand-in (standin.py). Each stage runs
in its own process, so its figure holds only what it needs. The process first imports torch and
mllm, reads its RSS (the baseline: the floor every stage starts from), resets the kernel's
peak-RSS mark (Linux: `5` to /proc/self/clear_refs), runs the stage, and reads the peak (VmHWM).

    train     4 training steps (AdamW) of batch 16 on the digits corpus (text corpus if the model reads no images)
    generate  8 conversations answered, 32 new tokens each, in one batch
    serve     the OpenAI-compatible app answering 4 requests in-process (fastapi's TestClient)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from mllm.bench.report import Figure
from mllm.bench.settings import Settings

SECTION = "7. memory"
STAGES = ("train", "generate", "serve")
STEPS, BATCH, CONVERSATIONS, NEW_TOKENS, REQUESTS = 4, 16, 8, 32, 4


def conversations(corpora: Path, images: bool, n: int) -> tuple[list[list[dict]], Path]:
    """n conversations of the digits corpus (or the text corpus), and the directory their media resolve in."""
    root = corpora / ("digits" if images else "text")
    records = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()[:n] if line.strip()]
    if images:
        return [r["messages"] for r in records], root
    return [[{"role": "assistant", "content": [{"type": "text", "text": r["text"]}]}] for r in records], root


def run_stage(stage: str, checkpoint: Path, corpora: Path) -> None:
    from mllm.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(checkpoint)
    images = "image" in pipe.processor.media_tokenizers
    if stage == "train":
        from mllm.bench.training import stepper
        from mllm.sequence import pad_collate

        chats, root = conversations(corpora, images, STEPS * BATCH)
        samples = [pipe.processor.encode(c, base_dir=root) for c in chats]
        batches = [pad_collate(samples[i : i + BATCH], pipe.processor.pad_id) for i in range(0, len(samples), BATCH)]
        stepper(pipe.model, [b.model_inputs() for b in batches])()
    elif stage == "generate":
        from mllm.generation import GenerationConfig

        chats, root = conversations(corpora, images, CONVERSATIONS)
        prompts = [[{**m, "content": with_paths(m["content"], root)} for m in c[:1]] for c in chats]
        pipe.chat(prompts, GenerationConfig(max_new_tokens=NEW_TOKENS))
    elif stage == "serve":
        from fastapi.testclient import TestClient

        from mllm.serve.app import create_app

        with TestClient(create_app(pipe)) as client:
            for i in range(REQUESTS):
                body = {"model": "mllm", "max_tokens": NEW_TOKENS,
                        "messages": [{"role": "user", "content": f"Count to {i + 3}."}]}
                client.post("/v1/chat/completions", json=body).raise_for_status()
    else:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")


def with_paths(content, root: Path):
    """Media paths made absolute, so the pipeline finds them without a base_dir."""
    if not isinstance(content, list):
        return content
    return [{**p, "path": str(root / p["path"])} if "path" in p else p for p in content]


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in MiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024


def measure(stage: str, checkpoint: Path, corpora: Path) -> dict[str, float]:
    """Run `stage` in a fresh interpreter: {"floor_mib", "peak_rss_mib"}; its failure names the stage and its error."""
    cmd = [sys.executable, "-m", "mllm.bench.memory", stage, str(checkpoint), str(corpora)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        error = done.stderr.strip().splitlines()[-1:] or ["no output"]  # a traceback's last line: the exception
        raise RuntimeError(f"memory stage {stage!r} on {checkpoint} exited with status {done.returncode}: {error[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(s: Settings) -> list[Figure]:
    from mllm.bench import corpus, standin

    corpora = corpus.corpora(s.data, s.work)
    checkpoint = s.model or standin.build_standin(corpora, s.work / "standin")
    model = f"model {s.model}" if s.model else "the stand-in model (standin.py: the tiny demo's sizes)"
    figures = []
    for stage in STAGES:
        rss = measure(stage, checkpoint, corpora)
        figures.append(Figure(SECTION, f"peak RSS, {stage}", "MiB", rss["peak_rss_mib"], None,
                              "after importing torch + mllm", rss["floor_mib"], note=model if not figures else ""))
    return figures


def main() -> None:
    stage, checkpoint, corpora = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    import mllm.pipeline  # noqa: F401 - the floor holds the imports

    floor = status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak mark restarts from the current RSS
    run_stage(stage, checkpoint, corpora)
    print(json.dumps({"stage": stage, "floor_mib": floor, "peak_rss_mib": status_mib("VmHWM")}))


if __name__ == "__main__":
    main()
