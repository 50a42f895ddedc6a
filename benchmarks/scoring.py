"""Few-shot log-likelihood scoring with and without computing the shared beginning once.

An MMLU-shaped chunk (what `gale eval` hands to one scoring call): `--questions` questions after the same
`--shots` worked examples, four single-token options each, on the default model unless --model.

    python benchmarks/scoring.py [--model PATH] [--questions 32] [--shots 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time


def question(i: int) -> str:
    return (f"Which of the following rivers is the {i}th longest in the region described in the atlas, given the "
            f"survey of year {1900 + i}?\nA. Nile\nB. Amazon\nC. Yangtze\nD. Mississippi\nAnswer:")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    import gale
    from gale.scoring import score_continuations

    llm = gale.load(a.model, device="cpu", dtype="fp32", progress=False)
    tok = llm.tokenizer
    head = "The following are multiple choice questions (with answers) about high school geography.\n\n"
    shots = "".join(f"{question(i)} {'ABCD'[i % 4]}\n\n" for i in range(a.shots))
    pairs = [(tok.encode(head + shots + question(100 + j)), tok.encode(f" {c}", bos=False))
             for j in range(a.questions) for c in "ABCD"]
    rows = []
    for name, min_shared in (("every input in full", 10**9), ("shared beginning once", 32)):
        t0 = time.perf_counter()
        scores = score_continuations(llm.model, pairs, min_shared=min_shared)
        rows.append((name, time.perf_counter() - t0, [s.total for s in scores]))
    tokens = a.questions * len(pairs[0][0])
    print(f"{a.questions} questions x 4 options, {a.shots} shots, {len(pairs[0][0])} prompt tokens each, "
          f"{a.threads} threads, model {a.model or 'default (SmolLM2-135M-Instruct Q4_1)'}\n")
    print("| scoring | seconds | prompt tokens/s | speed-up | max score difference |")
    print("|---|---|---|---|---|")
    for name, secs, totals in rows:
        diff = max(abs(x - y) for x, y in zip(totals, rows[0][2]))
        print(f"| {name} | {secs:.2f} | {tokens / secs:.0f} | {rows[0][1] / secs:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
