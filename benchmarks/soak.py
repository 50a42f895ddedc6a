"""Soak test: many concurrent streaming clients against `gale serve` on loopback, some misbehaving.

Starts the server in a subprocess on 127.0.0.1 (default model unless --model) and, for `--seconds`, keeps
`--clients` streaming clients busy: 10% disconnect mid-stream, 10% send hostile values (each must get a 4xx),
the rest ask greedy questions whose answers must equal the same questions asked one at a time before the
soak. At the end: failures among the well-behaved (must be 0), the server's RSS growth between the end of
warm-up and the end (must stay under 5%), and whether /metrics' request counts add up. Prints a Markdown table
and exits 1 if a check fails. Bounded in time and in requests (`--max-requests`); nothing leaves loopback.

    python benchmarks/soak.py [--model PATH] [--clients 64] [--seconds 60] [--max-tokens 24] [--max-seqs 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from server import gale_serve, sse_chunks  # the serving benchmark's server start and stream reader

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU cache is.",
             "Give me three tips for learning Python.", "Why is the sky blue?", "What is 17 times 23?",
             "Name a prime number above 100.", "What does HTTP stand for?"]
HOSTILE = [{"seed": 2**64}, {"temperature": 1e-30}, {"top_k": True}, {"n": 1000}, {"stop": ["x"] * 100},
           {"max_tokens": "many"}, {"top_p": -1}, {"messages": [{"role": "wizard", "content": "hi"}]},
           {"logprobs": True, "top_logprobs": 99}, {"ignore_eos": 1}]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def body(q: int, max_tokens: int, **extra: object) -> dict:
    return {"model": "soak", "messages": [{"role": "user", "content": QUESTIONS[q]}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, **extra}


async def streamed_text(client: httpx.AsyncClient, payload: dict, stop_after: int | None = None) -> str | None:
    """The streamed answer's text; None when the stream was abandoned after `stop_after` chunks on purpose."""
    text = []
    async with contextlib.aclosing(sse_chunks(client, payload)) as chunks:
        async for chunk in chunks:
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            text.append(chunk["choices"][0]["delta"].get("content", ""))
            if stop_after is not None and len(text) >= stop_after:
                return None  # leaving the `async with` closes the connection mid-stream
    return "".join(text)


@dataclass
class Tally:
    ok: int = 0
    wrong: list[str] = field(default_factory=list)  # well-behaved answers that differ or failed
    hostile_4xx: int = 0
    hostile_other: list[int] = field(default_factory=list)
    disconnected: int = 0


async def client_loop(c: int, url: str, a: argparse.Namespace, reference: list[str], tally: Tally,
                      deadline: float, budget: list[int]) -> None:
    rng = random.Random(c)
    kind = "disconnect" if c % 10 == 0 else "hostile" if c % 10 == 1 else "good"
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            q = rng.randrange(len(QUESTIONS))
            if kind == "hostile":
                r = await client.post("/v1/chat/completions", json={**body(q, a.max_tokens), **rng.choice(HOSTILE)})
                tally.hostile_4xx += 400 <= r.status_code < 500
                if not 400 <= r.status_code < 500:
                    tally.hostile_other.append(r.status_code)
                await asyncio.sleep(0.05)  # a steady trickle, not a flood that would crowd out the others
                continue
            try:
                text = await streamed_text(client, body(q, a.max_tokens), 2 if kind == "disconnect" else None)
            except (httpx.HTTPError, RuntimeError) as e:
                tally.wrong.append(f"{kind} {q}: {type(e).__name__}: {e}")
                continue
            if kind == "disconnect":
                tally.disconnected += 1
            elif text == reference[q]:
                tally.ok += 1
            else:
                tally.wrong.append(f"question {q}: {text!r} != {reference[q]!r}")


def metrics(url: str) -> dict[str, float]:
    lines = httpx.get(url + "/metrics", timeout=30).text.splitlines()
    return {k.removeprefix("gale_"): float(v) for k, v in (x.split() for x in lines if not x.startswith("#"))}


async def soak(url: str, a: argparse.Namespace, reference: list[str], pid: int) -> tuple[Tally, float, float]:
    tally, start = Tally(), time.monotonic()
    deadline, budget = start + a.seconds, [a.max_requests]
    tasks = [asyncio.create_task(client_loop(c, url, a, reference, tally, deadline, budget)) for c in range(a.clients)]
    await asyncio.sleep(min(10, a.seconds / 6))  # warm-up: buffers and caches grow to their working size
    rss_start = rss_mb(pid)
    await asyncio.gather(*tasks)
    return tally, rss_start, rss_mb(pid)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-requests", type=int, default=20_000, help="stop after this many requests in all")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-seqs", type=int, default=16)
    a = p.parse_args()
    args = ["--served-model-name", "soak", "--max-seqs", str(a.max_seqs), "--max-queue", str(2 * a.clients)]
    with gale_serve(args, a.model) as (url, server):
        reference = [asyncio.run(one(url, q, a.max_tokens)) for q in range(len(QUESTIONS))]  # one at a time
        tally, rss0, rss1 = asyncio.run(soak(url, a, reference, server.pid))
        time.sleep(1)
        m = metrics(url)
    code = server.returncode
    report(a, tally, rss0, rss1, m, code)


async def one(url: str, q: int, max_tokens: int) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return await streamed_text(client, body(q, max_tokens))


def report(a: argparse.Namespace, t: Tally, rss0: float, rss1: float, m: dict[str, float], code: int) -> None:
    growth = (rss1 - rss0) / rss0 * 100
    ended = m["requests_finished_total"] + m["requests_cancelled_total"] + m["requests_failed_total"]
    adds_up = m["requests_total"] == ended and m["running_sequences"] == 0 and m["waiting_sequences"] == 0
    checks = {"well-behaved failures or mismatches": (len(t.wrong), len(t.wrong) == 0),
              "hostile requests not answered 4xx": (len(t.hostile_other), not t.hostile_other),
              f"RSS growth after warm-up ({rss0:.0f} -> {rss1:.0f} MB)": (f"{growth:+.1f}%", growth < 5),
              f"/metrics: requests {m['requests_total']:.0f} = finished + cancelled + failed ({ended:.0f})":
                  ("yes" if adds_up else "no", adds_up),
              "requests failed (metrics)": (int(m["requests_failed_total"]), m["requests_failed_total"] == 0),
              "exit status after SIGTERM": (code, code == 0)}
    print(f"{a.clients} clients, {a.seconds:g} s, {a.max_tokens} tokens: {t.ok} well-behaved answers equal to "
          f"sequential runs, {t.disconnected} disconnected mid-stream, {t.hostile_4xx} hostile requests refused\n")
    print("| check | value | ok |\n|---|---|---|")
    for name, (value, ok) in checks.items():
        print(f"| {name} | {value} | {'yes' if ok else 'NO'} |")
    for w in t.wrong[:5]:
        print("  ", w)
    sys.exit(0 if all(ok for _, ok in checks.values()) else 1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
