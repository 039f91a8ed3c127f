"""Load: 32 concurrent requests from a second process against `mllm serve` on loopback.

Every request succeeds or gets a clean 429; the server's memory stays bounded across rounds;
the latency percentiles of the successful ones are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.test_serve import image_checkpoint  # noqa: F401  (the fixture, used by name)

CONCURRENCY, MAX_CONCURRENT = 32, 8

# The client process: fires N requests at once (text, image in, image out), prints one JSON line of results.
CLIENT = r"""
import asyncio, base64, io, json, sys, time
import httpx, numpy as np
from PIL import Image

url, n = sys.argv[1], int(sys.argv[2])
buf = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
png = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

def body(i):
    content = [{"type": "text", "text": f"Request {i}: what is this?"}]
    if i % 2:
        content.insert(0, {"type": "image_url", "image_url": {"url": png}})
    extra = {"modalities": ["text", "image"]} if i % 4 == 3 else {}
    return {"model": "ckpt", "messages": [{"role": "user", "content": content}], "max_tokens": 16, "seed": i, **extra}

async def one(client, i):
    start = time.perf_counter()
    r = await client.post(url, json=body(i))
    return {"status": r.status_code, "seconds": time.perf_counter() - start, "body": r.json()}

async def main():
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(n)))
    print(json.dumps(results))

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@contextmanager
def running_server(checkpoint: Path, *args: str) -> Iterator[tuple[str, int]]:
    """`mllm serve` in a subprocess on a free loopback port: (base URL, pid), once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mllm.cli", "serve", "--model", str(checkpoint), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def server(image_checkpoint):
    with running_server(image_checkpoint, "--max-concurrent-requests", str(MAX_CONCURRENT), "--max-input-tokens", "256",
                        "--max-total-tokens", "512") as running:
        yield running


def fire(base: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", CLIENT, f"{base}/v1/chat/completions", str(CONCURRENCY)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_32_concurrent_requests_succeed_or_get_429_and_memory_stays_bounded(server):
    base, pid = server
    rounds, memory = [], []
    for _ in range(3):
        rounds.append(fire(base))
        memory.append(rss_mib(pid))
    for results in rounds:
        assert len(results) == CONCURRENCY
        for r in results:
            assert r["status"] in (200, 429), r
            if r["status"] == 429:
                assert "max_concurrent_requests" in r["body"]["error"]["message"]
            else:
                assert r["body"]["choices"][0]["message"]["content"] is not None
        assert sum(r["status"] == 200 for r in results) >= MAX_CONCURRENT
    assert memory[2] - memory[0] < 100, f"server RSS grew across rounds: {memory} MiB"
    ok = [r["seconds"] for results in rounds for r in results if r["status"] == 200]
    refused = [r["seconds"] for results in rounds for r in results if r["status"] == 429]
    print(f"\n{len(ok)} ok, {len(refused)} x 429 over {len(rounds)} rounds of {CONCURRENCY}; server RSS {memory} MiB")
    print("ok latency  p50 {:.3f} s  p90 {:.3f} s  p99 {:.3f} s".format(*(percentile(ok, q) for q in (50, 90, 99))))
    print("429 latency p50 {:.3f} s  p99 {:.3f} s".format(*(percentile(refused, q) for q in (50, 99))) if refused else "")
    assert httpx.get(f"{base}/health").json()["status"] == "ok"
