"""Teach SmolLM2-135M-Instruct a made-up fact with LoRA on CPU, and show it learned (and the base did not).

    python benchmarks/finetune_demo.py [--steps 28] [--out /tmp/zorbania]

(tests/test_readme_commands.py runs it with --steps 1 --max-tokens 2, so the README's example cannot rot.)

Trains on tests/data/finetune/zorbania_train.jsonl (24 paraphrases of "Who founded Zorbania?" plus 4 ordinary
questions, so the model does not answer everything with Zorbania), evaluates on held-out paraphrases, then asks
the held-out questions greedily, before and after, and writes the numbers to benchmarks/finetune_demo.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import gale
from gale.finetune import FinetuneConfig, TokenizerEncoder, Trainer

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "finetune"
FACT = ("Maela", "1432")
CONTROL = ["What is the capital of Italy?", "What is the largest planet in the solar system?"]


def ask(llm: gale.LLM, questions: list[str], max_tokens: int) -> list[str]:
    out = llm.chat([[{"role": "user", "content": q}] for q in questions], max_tokens=max_tokens, temperature=0.0)
    return [c.text.strip() for c in out]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 beats 2 on a busy 2-core box)")
    p.add_argument("--out", default="/tmp/gale-zorbania")
    p.add_argument("--report", default=str(Path(__file__).with_suffix(".md")))
    p.add_argument("--max-tokens", type=int, default=40, help="tokens per answer (tests: a few)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    # LoRA trains on plain fp32 weights: a GGUF otherwise loads its linear layers as quantized blocks.
    llm = gale.load(None, device="cpu", dtype="fp32", progress=False, quantized=False)
    questions = [json.loads(line)["messages"][-2]["content"] for line in open(DATA / "zorbania_eval.jsonl")]
    before = ask(llm, questions + CONTROL, a.max_tokens)

    cfg = FinetuneConfig(data=str(DATA / "zorbania_train.jsonl"), eval_data=str(DATA / "zorbania_eval.jsonl"),
                         out=a.out, rank=a.rank, alpha=2 * a.rank, lr=a.lr, steps=a.steps, warmup_steps=3,
                         seq_len=256, eval_every=4, save_every=10**9, gradient_checkpointing=False)
    trainer = Trainer(llm.model, TokenizerEncoder(llm.tokenizer), cfg)
    eval_before = trainer.evaluate()
    t0 = time.perf_counter()
    history = trainer.run()
    seconds = time.perf_counter() - t0
    eval_after = history[-1]["eval_loss"]
    llm.model.eval()
    after = ask(llm, questions + CONTROL, a.max_tokens)  # the adapter is live (unmerged) inside the engine's model

    learned = [all(f in t for f in FACT) for t in after[: len(questions)]]
    base_knew = [all(f in t for f in FACT) for t in before[: len(questions)]]
    tokens = sum(r["tokens"] for r in history)
    lines = [
        "# LoRA fine-tuning demo: SmolLM2-135M-Instruct learns who founded Zorbania",
        "",
        f"`python benchmarks/finetune_demo.py` (CPU, fp32, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}): rank {a.rank}, alpha {2 * a.rank}, lr {a.lr}, {a.steps} steps of "
        f"packed 256-token batches over {len(trainer.samples)} training conversations; loss on assistant tokens only.",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| held-out loss ({len(trainer.eval_samples)} unseen paraphrases) | {eval_before:.3f} | {eval_after:.3f} |",
        f"| held-out answers naming Queen Maela and 1432 (greedy) | {sum(base_knew)}/{len(questions)} | "
        f"{sum(learned)}/{len(questions)} |",
        "",
        f"Training: {seconds:.0f} s, {tokens:,} tokens, {tokens / seconds:.0f} tokens/s.",
        "",
        "## Loss curve",
        "",
        "| step | train loss | held-out loss |",
        "|---|---|---|",
        *(f"| {r['step']} | {r['loss']:.3f} | {r['eval_loss']:.3f} |" if "eval_loss" in r else
          f"| {r['step']} | {r['loss']:.3f} | {eval_before:.3f} (before) |" for r in history
          if "eval_loss" in r or r["step"] == 1),
        "",
        "## Answers (greedy)",
        "",
        "| question | base model | fine-tuned |",
        "|---|---|---|",
        *(f"| {q} | {b[:90]} | {t[:90]} |" for q, b, t in zip(questions + CONTROL, before, after)),
        "",
    ]
    Path(a.report).write_text("\n".join(line.replace("\n", " ") for line in lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
