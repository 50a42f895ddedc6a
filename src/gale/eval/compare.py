"""Side by side: a task file through Gale's own runner and through lm-eval (its `hf` model: transformers on the same
weights, an HF folder or the GGUF dequantized; or Gale's own registered "gale" model), with both scores.

Both read the same prompts (Gale's task formats, README "Evaluation"), so what differs is the model, the
tokenization of a request, the scoring or the decoding. Multiple-choice tasks compare every option's
log-likelihood (the largest difference and its item) and the picks; generation tasks compare the greedy texts
(one sample, whatever maj@k the task has: samplers differ between engines) as lm-eval's `generate_until` returns
them, both scored by the same answer rules (or programs run), with how many texts and scores differ.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .metrics import choice_metrics
from .runner import LM, ResultCache, Settings, evaluate_task, score_texts
from .tasks import Request, Task, get_task, load_requests

REFERENCES = ("hf", "gale")


def reference_model(lm: LM, kind: str = "hf", *, add_bos_token: bool | None = None) -> Any:
    """lm-eval's own `hf` model on Gale's model path (fp32 on the CPU), or lm-eval's "gale" model on `lm` itself."""
    if kind == "gale":
        from .harness import harness_model

        return harness_model()(lm, add_bos_token=add_bos_token)
    if kind != "hf":
        raise ValueError(f"reference {kind!r}: one of {', '.join(REFERENCES)}")
    from lm_eval.models.huggingface import HFLM

    path = Path(lm.path)
    where = {"pretrained": str(path.parent), "gguf_file": path.name} if path.suffix == ".gguf" else \
        {"pretrained": str(path)}
    return HFLM(**where, device="cpu", dtype="float32", batch_size=1, add_bos_token=add_bos_token)


def compare(lm: LM, reference: Any, task_name: str, data: str | Path, *, fewshot: str | Path | None = None,
            shots: int | None = None, limit: int | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Both runs' headline scores (%) and how the items differ (see the module's docstring)."""
    task = get_task(task_name)
    settings = settings or Settings()
    if settings.chat:
        raise ValueError("compare sends lm-eval the raw prompts; --chat prompts are Gale's own")
    k = task.shots if shots is None else shots
    reqs = load_requests(task, data, fewshot=fewshot, shots=k, limit=limit)
    with tempfile.TemporaryDirectory() as tmp:  # a fresh run: nothing from an earlier cache
        ours = evaluate_task(lm, task, reqs, ResultCache(Path(tmp) / "cache.jsonl"), settings, shots=k, samples=1,
                             progress=False)
    head = {"task": task_name, "kind": task.kind, "n": len(reqs), "shots": k}
    if task.kind == "choice":
        return {**head, **_choices(task, reqs, ours, reference)}
    return {**head, **_generations(task, reqs, ours, reference, settings)}


def _choices(task: Task, reqs: list[Request], ours: list[dict], reference: Any) -> dict[str, Any]:
    """The largest |log-likelihood difference| of any option and its item, and how often both pick the same."""
    from lm_eval.api.instance import Instance

    pairs = [(c, x) for r in reqs for c, x in r.options]
    scores = iter(lp for lp, _ in reference.loglikelihood([Instance("loglikelihood", {}, p, i)
                                                           for i, p in enumerate(pairs)], disable_tqdm=True))
    theirs, worst = [], (0.0, None)
    for i, (r, mine) in enumerate(zip(reqs, ours)):
        totals = [next(scores) for _ in r.options]
        theirs.append({**choice_metrics(totals, [x for _, x in r.options], r.label), "logprobs": totals})
        diff = max(abs(a - b) for a, b in zip(mine["logprobs"], totals))
        worst = max(worst, (diff, i), key=lambda w: w[0])
    same = sum(_pick(a["logprobs"]) == _pick(b["logprobs"]) for a, b in zip(ours, theirs))
    return {**_scores(task.metric, task.metric, ours, theirs), "max_diff": worst[0], "max_diff_item": worst[1],
            "same_prediction": same / max(len(reqs), 1)}


def _generations(task: Task, reqs: list[Request], ours: list[dict], reference: Any,
                 settings: Settings) -> dict[str, Any]:
    """Greedy texts through lm-eval's generate_until (the task's stops and token budget), scored by Gale's rules."""
    from lm_eval.api.instance import Instance

    args = {"until": list(task.stop), "max_gen_toks": task.max_tokens, "do_sample": False}
    texts = reference.generate_until([Instance("generate_until", {}, (r.prompt, args), i)
                                      for i, r in enumerate(reqs)], disable_tqdm=True)
    theirs = score_texts(task, reqs, [texts], settings)
    mine = [r["completion"] if task.kind == "code" else r["outputs"][0] for r in ours]
    differ = [i for i, (a, b) in enumerate(zip(mine, texts)) if a != b]
    key = "pass@1" if task.kind == "code" else task.metric
    return {**_scores(key, "maj@1 (greedy)" if task.samples > 1 else key, ours, theirs),
            "texts_differ": len(differ),
            "first_space_only": sum(mine[i] == " " + texts[i] for i in differ),  # hf decodes without the prompt
            "scores_differ": sum(a[key] != b[key] for a, b in zip(ours, theirs)),
            "first_difference": next((d for i in differ if (d := _difference(i, mine[i], texts[i]))), None)}


def _difference(item: int, mine: str, theirs: str) -> dict[str, Any] | None:
    """Where two texts part, past the first space lm-eval's hf drops (None when that space is all that differs);
    `at` counts characters of lm-eval's text."""
    if mine.startswith(" ") and not theirs.startswith(" "):
        mine = mine[1:]
    if mine == theirs:
        return None
    at = next((j for j, (x, y) in enumerate(zip(mine, theirs)) if x != y), min(len(mine), len(theirs)))
    return {"item": item, "at": at, "gale": mine[at:at + 24], "lm_eval": theirs[at:at + 24]}


def _scores(key: str, metric: str, ours: list[dict], theirs: list[dict]) -> dict[str, Any]:
    n = max(len(ours), 1)
    return {"metric": metric, "gale": 100 * sum(r[key] for r in ours) / n,
            "lm_eval": 100 * sum(r[key] for r in theirs) / n}


def _pick(totals: list[float]) -> int:
    return max(range(len(totals)), key=totals.__getitem__)


def markdown(row: dict[str, Any], reference: str = "hf") -> str:
    """One table row; the columns depend on the task's kind."""
    cells = [row["task"], row["metric"], str(row["n"]), f"{row['gale']:.2f}", f"{row['lm_eval']:.2f}"]
    if row["kind"] == "choice":
        head = ["largest per-item log-likelihood difference", "same prediction"]
        cells += [f"{row['max_diff']:.2e} (item {row['max_diff_item']})", f"{100 * row['same_prediction']:.0f}%"]
    else:
        head = ["texts that differ (only lm-eval's dropped first space)", "items scored differently",
                "first other difference"]
        f = row["first_difference"]
        cells += [f"{row['texts_differ']} ({row['first_space_only']})", str(row["scores_differ"]),
                  "-" if f is None else f"item {f['item']}, char {f['at']}: {f['gale']!r} vs {f['lm_eval']!r}"]
    cols = ["task", "metric", "n", "Gale", f"lm-eval {reference}", *head]
    escaped = [c.replace("|", "\\|") for c in cells]  # a text's own pipes
    return f"| {' | '.join(cols)} |\n|{'---|' * len(cols)}\n| {' | '.join(escaped)} |\n"
