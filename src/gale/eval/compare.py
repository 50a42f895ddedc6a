"""Side by side: a task file's multiple-choice items through Gale's own runner and through lm-eval's `hf` model
(transformers on the same weights: an HF folder, or the GGUF dequantized), with both scores and the largest
per-item log-likelihood difference. Both read the same prompts (Gale's task formats, README "Evaluation"), so
what differs is the model, the tokenization of a request and the scoring: lm-eval's `hf` is the reference.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .metrics import choice_metrics
from .runner import LM, ResultCache, Settings, evaluate_task
from .tasks import get_task, load_requests


def reference_model(path: str | Path, *, add_bos_token: bool | None = None) -> Any:
    """lm-eval's own `hf` model on Gale's model path, fp32 on the CPU."""
    from lm_eval.models.huggingface import HFLM

    path = Path(path)
    where = {"pretrained": str(path.parent), "gguf_file": path.name} if path.suffix == ".gguf" else \
        {"pretrained": str(path)}
    return HFLM(**where, device="cpu", dtype="float32", batch_size=1, add_bos_token=add_bos_token)


def compare(lm: LM, reference: Any, task_name: str, data: str | Path, *, fewshot: str | Path | None = None,
            shots: int | None = None, limit: int | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Both runs' headline scores (%), the largest |log-likelihood difference| of any option and its item, and how
    often the two pick the same option."""
    from lm_eval.api.instance import Instance

    task = get_task(task_name)
    if task.kind != "choice":
        raise ValueError(f"compare scores multiple-choice tasks (log-likelihoods); {task_name} is a {task.kind} task")
    settings = settings or Settings()
    k = task.shots if shots is None else shots
    reqs = load_requests(task, data, fewshot=fewshot, shots=k, limit=limit)
    with tempfile.TemporaryDirectory() as tmp:  # a fresh run: nothing from an earlier cache
        ours = evaluate_task(lm, task, reqs, ResultCache(Path(tmp) / "cache.jsonl"), settings, shots=k, samples=1,
                             progress=False)
    pairs = [(c, x) for r in reqs for c, x in r.options]
    scores = iter(lp for lp, _ in reference.loglikelihood([Instance("loglikelihood", {}, p, i)
                                                           for i, p in enumerate(pairs)], disable_tqdm=True))
    theirs, worst = [], (0.0, None)
    for i, (r, mine) in enumerate(zip(reqs, ours)):
        totals = [next(scores) for _ in r.options]
        theirs.append({**choice_metrics(totals, [x for _, x in r.options], r.label), "logprobs": totals})
        diff = max(abs(a - b) for a, b in zip(mine["logprobs"], totals))
        worst = max(worst, (diff, i), key=lambda w: w[0])
    n = max(len(reqs), 1)
    same = sum(_pick(a["logprobs"]) == _pick(b["logprobs"]) for a, b in zip(ours, theirs))
    return {"task": task_name, "metric": task.metric, "n": len(reqs), "shots": k,
            "gale": 100 * sum(r[task.metric] for r in ours) / n,
            "lm_eval": 100 * sum(r[task.metric] for r in theirs) / n,
            "max_diff": worst[0], "max_diff_item": worst[1], "same_prediction": same / n}


def _pick(totals: list[float]) -> int:
    return max(range(len(totals)), key=totals.__getitem__)


def markdown(row: dict[str, Any]) -> str:
    return ("| task | metric | n | Gale | lm-eval hf | largest per-item log-likelihood difference | same prediction |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {row['task']} | {row['metric']} | {row['n']} | {row['gale']:.2f} | {row['lm_eval']:.2f} | "
            f"{row['max_diff']:.2e} (item {row['max_diff_item']}) | {100 * row['same_prediction']:.0f}% |\n")
