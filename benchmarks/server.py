"""Serving benchmark: throughput, requests/s, latency and time to first token at several concurrencies.

Starts `gale serve` on loopback in a subprocess (default model unless --model), then drives it with streaming
chat requests through httpx, `--requests-per-level` x concurrency requests at each level. Prints a Markdown table.

    python benchmarks/server.py [--model PATH] [--levels 1 4 16 64] [--max-tokens 64] [--max-seqs 16]
        [--prefix-cache TOKENS] [--distinct]

The questions cycle through six, so with the prefix cache on (the server's default) most of each prompt is
reused; `--distinct` makes every question unique (only the chat template's start is shared) and
`--prefix-cache 0` computes every prompt in full.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import httpx

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU cache is.",
             "Give me three tips for learning Python.", "Why is the sky blue?", "What is 17 times 23?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gale_serve(args: list[str], model: str | None = None, env: dict[str, str] | None = None,
               ) -> Iterator[tuple[str, subprocess.Popen]]:
    """`gale serve ARGS` on a free loopback port, once /health answers 200: its URL and process (soak.py's too).
    SIGTERM when the block ends, so the process's returncode is its drained exit status."""
    port = free_port()
    cmd = [sys.executable, "-m", "gale.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args,
           *(["--model", model] if model else [])]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        yield url, server
    finally:
        server.terminate()
        server.wait(timeout=60)


def wait_ready(url: str, server: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and server.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit("server did not start")


async def one_request(client: httpx.AsyncClient, i: int, max_tokens: int, tag: str) -> tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streamed greedy chat request."""
    content = (tag.format(i=i) + " " if tag else "") + QUESTIONS[i % len(QUESTIONS)]
    body = {"model": "bench", "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start, first, tokens = time.perf_counter(), None, 0
    async for chunk in sse_chunks(client, body):
        if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - start
        if chunk.get("choices") and chunk["choices"][0].get("finish_reason") == "length":
            tokens = max_tokens  # EOS is ignored, so every request runs to max_tokens
    return time.perf_counter() - start, first or 0.0, tokens


async def sse_chunks(client: httpx.AsyncClient, body: dict) -> AsyncIterator[dict]:
    """The JSON chunks of a streamed chat completion; closing the generator early (contextlib.aclosing) hangs up."""
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def level(url: str, concurrency: int, n: int, max_tokens: int, tag: str) -> dict[str, float]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def bounded(i: int) -> tuple[float, float, int]:
            async with sem:
                return await one_request(client, i, max_tokens, tag)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(n)))
        wall = time.perf_counter() - start
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"concurrency": concurrency, "requests": n, "tokens/s": sum(r[2] for r in results) / wall,
            "requests/s": n / wall, "p50 latency": statistics.median(lat), "p99 latency": q(lat, 0.99),
            "p50 TTFT": statistics.median(ttft), "p99 TTFT": q(ttft, 0.99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests-per-level", type=int, default=2, help="requests = this x concurrency (min 4)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-seqs", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prefix-cache", type=int, default=2048, help="the server's prefix cache in tokens (0 = off)")
    p.add_argument("--distinct", action="store_true",
                   help="open every question with its request number: only the chat template's start is shared")
    a = p.parse_args()
    args = ["--served-model-name", "bench", "--max-seqs", str(a.max_seqs), "--max-queue", str(max(a.levels) * 2),
            "--prefix-cache", str(a.prefix_cache)]
    with gale_serve(args, a.model, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)}) as (url, _):
        tags = [f"(request {c}-{{i}})" if a.distinct else "" for c in a.levels]
        rows = [asyncio.run(level(url, c, max(4, a.requests_per_level * c), a.max_tokens, t))
                for c, t in zip(a.levels, tags)]
    print(f"gale serve, max-seqs {a.max_seqs}, prefix cache {a.prefix_cache} tokens"
          f"{', distinct questions' if a.distinct else ''}, {a.max_tokens} new tokens "
          "per request (greedy, EOS ignored), "
          f"{a.threads} threads, model {a.model or 'default (SmolLM2-135M-Instruct Q4_1)'}\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
