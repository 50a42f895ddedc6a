"""Results as JSON, a Markdown table and a bar chart next to the paper's published numbers.

The reference numbers are Table 2 of the Mistral 7B paper (arXiv 2310.06825), all models re-evaluated
there with one pipeline. A run with `limit` or changed shots/samples is not comparable to them;
the table says so by listing n, shots and samples beside every score.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PAPER: dict[str, dict[str, float]] = {
    "Llama 2 7B": {"mmlu": 44.4, "hellaswag": 77.1, "winogrande": 69.5, "piqa": 77.9, "arc_easy": 68.7,
                   "arc_challenge": 43.2, "naturalquestions": 24.7, "triviaqa": 63.8, "humaneval": 11.6,
                   "mbpp": 26.1, "math": 3.9, "gsm8k": 16.0},
    "Llama 2 13B": {"mmlu": 55.6, "hellaswag": 80.7, "winogrande": 72.9, "piqa": 80.8, "arc_easy": 75.2,
                    "arc_challenge": 48.8, "naturalquestions": 29.0, "triviaqa": 69.6, "humaneval": 18.9,
                    "mbpp": 35.4, "math": 6.0, "gsm8k": 34.3},
    "Code-Llama 7B": {"mmlu": 36.9, "hellaswag": 62.9, "winogrande": 62.3, "piqa": 72.8, "arc_easy": 59.4,
                      "arc_challenge": 34.5, "naturalquestions": 11.0, "triviaqa": 34.9, "humaneval": 31.1,
                      "mbpp": 52.5, "math": 5.2, "gsm8k": 20.8},
    "Mistral 7B": {"mmlu": 60.1, "hellaswag": 81.3, "winogrande": 75.3, "piqa": 83.0, "arc_easy": 80.0,
                   "arc_challenge": 55.5, "naturalquestions": 28.8, "triviaqa": 69.9, "humaneval": 30.5,
                   "mbpp": 47.5, "math": 13.1, "gsm8k": 52.2},
}


def markdown(report: dict[str, Any]) -> str:
    head = ["task", "metric", report["model"], "n", "shots", "samples", *PAPER]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in report["tasks"].items():
        paper = [f"{PAPER[m][name]:.1f}" if name in PAPER[m] else "" for m in PAPER]
        rows.append(f"| {name} | {t['metric']} | {t['score']:.1f} | {t['n']} | {t['shots']} | {t['samples']} | "
                    + " | ".join(paper) + " |")
    return "\n".join(rows) + "\n"


def bar_chart(report: dict[str, Any], path: Path) -> bool:
    """Grouped bars per task (the model and the paper's four); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = list(report["tasks"])
    series = {report["model"]: [report["tasks"][t]["score"] for t in tasks]}
    series.update({m: [PAPER[m].get(t, 0.0) for t in tasks] for m in PAPER})
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(tasks)), 4.5))
    for k, (label, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(tasks))], values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=20)
    ax.set_ylabel("score (%)")
    ax.set_title("gale eval vs Mistral 7B paper, Table 2")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "results.md").write_text(markdown(report), encoding="utf-8")
    if not bar_chart(report, out_dir / "results.png"):
        print("gale eval: matplotlib is not installed, so no results.png (pip install matplotlib)", file=sys.stderr)
