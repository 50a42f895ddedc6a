"""Running benchmarks on a loaded model: batched scoring, generation, execution, a resumable cache.

Items are processed in chunks: a chunk's multiple-choice options go through one
`score_continuations` call (packed, many continuations per forward), a chunk's prompts through one
`lm.generate` call per sample. After each chunk every item's result is appended to a JSONL cache
keyed by task, item index and a digest of everything that changes the result (prompt, settings,
model), so an interrupted run resumes where it stopped and a changed setting never reuses stale results.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from ..model import Transformer
from ..scoring import score_continuations, sequence_logprobs
from .metrics import choice_metrics, majority, pass_at_k
from .sandbox import run_programs
from .tasks import Choice, Code, Generate, Request, Task, get_task, load_requests


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    chat_template: str | None

    def encode(self, text: str, bos: bool | None = ...) -> list[int]: ...

    def id_to_piece(self, token_id: int) -> str: ...


class Completion(Protocol):
    text: str


class LM(Protocol):
    """What evaluation needs of a model: gale.LLM satisfies it."""

    tokenizer: Tokenizer
    model: Transformer

    def generate(self, prompts: list[str], **sampling: Any) -> list[Completion]: ...

    def generate_ids(self, prompts: list[list[int]], **sampling: Any) -> list[Completion]: ...


@dataclass(frozen=True)
class Settings:
    """Everything besides the prompt that changes an item's result (and so its cache key)."""

    model: str = "model"
    temperature: float = 0.6  # for maj@k sampling; single-sample tasks decode greedily
    seed: int = 0
    max_batch_tokens: int = 4096
    timeout: float = 10.0  # seconds per program
    memory_mb: int = 2048  # address-space limit per program
    chat: bool = False  # tasks with a chat protocol (HumanEval) ask in the model's chat format
    bos: bool | None = None  # BOS before scored contexts; None: the tokenizer's own default, as lm-eval's hf model


def prefix_token(tokenizer: Tokenizer) -> int:
    """What an empty context reads (lm-eval's prefix_token_id): BOS, or EOS for a vocabulary without one."""
    token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if token is None:
        raise ValueError("the tokenizer has neither BOS nor EOS to stand for an empty context")
    return token


def encode_text(tokenizer: Tokenizer, text: str, bos: bool | None = None) -> list[int]:
    """`text`'s ids as lm-eval's hf model encodes them: BOS per `bos` (None: the tokenizer's default), never a
    second one when the text spells BOS out itself."""
    if tokenizer.bos_id is not None and text.startswith(tokenizer.id_to_piece(tokenizer.bos_id)):
        bos = False
    return tokenizer.encode(text, bos=tokenizer.add_bos if bos is None else bos)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str,
                bos: bool | None = None) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) exactly as lm-evaluation-harness's hf model makes them.

    Trailing whitespace moves from the context into the continuation (SentencePiece attaches a space to the
    word after it); the continuation is the joint encoding after the context's tokens, so scores see the tokens
    the model would have read; an empty context is the prefix token (BOS, else EOS) unless the continuation
    starts with it. BOS per `bos` (None: the tokenizer's default: Mistral adds one, SmolLM2 none).
    """
    if not context:
        cont = tokenizer.encode(continuation, bos=False)
        prefix = prefix_token(tokenizer)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = encode_text(tokenizer, context, bos)
    return ctx, encode_text(tokenizer, context + continuation, bos)[len(ctx):]


class ResultCache:
    """Append-only JSONL of {key, result}; a torn last line (the run was killed mid-write) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.results: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.results[row["key"]] = row["result"]

    def put(self, rows: list[tuple[str, dict]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps({"key": k, "result": r}) + "\n" for k, r in rows)
        self.results.update(rows)


def item_key(task: Task, index: int, request: Request, settings: Settings, shots: int, samples: int) -> str:
    blob = json.dumps([task.name, index, asdict(request), asdict(settings), shots, samples, task.max_tokens,
                       list(task.stop)], sort_keys=True, default=str)
    return f"{task.name}/{index}/{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _score_choices(lm: LM, reqs: list[Choice], settings: Settings) -> list[dict]:
    pairs = [encode_pair(lm.tokenizer, c, x, settings.bos) for r in reqs for c, x in r.options]
    scores = iter(score_continuations(lm.model, pairs, max_batch_tokens=settings.max_batch_tokens))
    out = []
    for r in reqs:
        totals = [next(scores).total for _ in r.options]
        out.append({**choice_metrics(totals, [x for _, x in r.options], r.label), "logprobs": totals})
    return out


def _sample(lm: LM, task: Task, prompts: list[str], samples: int, settings: Settings) -> list[list[str]]:
    """samples x len(prompts) texts: one generate call per sample index, each with its own seed."""
    temperature = settings.temperature if samples > 1 else 0.0
    return [[c.text for c in lm.generate(prompts, max_tokens=task.max_tokens, temperature=temperature,
                                         seed=settings.seed + j, stop=list(task.stop))] for j in range(samples)]


def score_texts(task: Task, reqs: list[Any], texts: list[list[str]], settings: Settings) -> list[dict]:
    """Per-item results of generated texts (samples x len(reqs)), however they were generated: answers extracted
    and matched, or programs run (`gale eval compare` scores lm-eval's texts with it too)."""
    if task.kind == "code":
        return _run_code(task, reqs, texts, settings)
    return _match_answers(task, reqs, texts)


def _match_answers(task: Task, reqs: list[Generate], outs: list[list[str]]) -> list[dict]:
    results = []
    for i, r in enumerate(reqs):
        texts = [o[i] for o in outs]
        answers = [task.extract(t) for t in texts]
        pred = majority(answers)
        results.append({"outputs": texts, "answers": answers, "pred": pred,
                        task.metric: float(task.match(pred, r.golds))})
    return results


def _code_texts(lm: LM, task: Task, reqs: list[Code], samples: int, settings: Settings) -> list[list[str]]:
    """samples x len(reqs) answers: greedy for one sample, else at the settings' temperature, one seed each."""
    if not (settings.chat and task.chat is not None):
        return _sample(lm, task, [r.prompt for r in reqs], samples, settings)
    from ..chat import encode_chat

    asks = [task.chat(r) for r in reqs]
    ids = [encode_chat(lm.tokenizer, [{"role": "user", "content": user}]) + lm.tokenizer.encode(start, bos=False)
           for user, start in asks]
    temperature = settings.temperature if samples > 1 else 0.0
    return [[c.text for c in lm.generate_ids(ids, max_tokens=task.max_tokens, temperature=temperature,
                                             seed=settings.seed + j, stop=["```"])]  # the block's end
            for j in range(samples)]


def _run_code(task: Task, reqs: list[Code], texts: list[list[str]], settings: Settings) -> list[dict]:
    """Every sample run against the tests; pass@k (k = 1, 10, 100 up to the samples) by the unbiased estimator."""
    samples = len(texts)
    runs = run_programs([r.program(t) for s in texts for r, t in zip(reqs, s)], timeout=settings.timeout,
                        memory_mb=settings.memory_mb)
    out = []
    for i in range(len(reqs)):
        mine = [runs[j * len(reqs) + i] for j in range(samples)]
        passed = sum(x.passed for x in mine)
        row = {"completion": texts[0][i], "status": mine[0].status,
               **{f"pass@{k}": pass_at_k(samples, passed, k) for k in (1, 10, 100) if k <= samples}}
        if samples > 1:
            row |= {"completions": [t[i] for t in texts], "statuses": [x.status for x in mine], "passed": passed}
        out.append(row)
    return out


def evaluate_task(lm: LM, task: Task, requests: list[Request], cache: ResultCache, settings: Settings, *,
                  shots: int, samples: int, chunk: int = 32, progress: bool = True) -> list[dict]:
    """Per-item results in order, computing only the items missing from the cache."""
    keys = [item_key(task, i, r, settings, shots, samples) for i, r in enumerate(requests)]
    todo = [i for i, k in enumerate(keys) if k not in cache.results]
    with tqdm(total=len(requests), initial=len(requests) - len(todo), desc=task.name, unit="item",
              disable=not progress) as bar:
        for s in range(0, len(todo), chunk):
            idx = todo[s : s + chunk]
            reqs: list[Any] = [requests[i] for i in idx]
            if task.kind == "choice":
                res = _score_choices(lm, reqs, settings)
            elif task.kind == "code":
                res = _run_code(task, reqs, _code_texts(lm, task, reqs, samples, settings), settings)
            else:
                res = _match_answers(task, reqs, _sample(lm, task, [r.prompt for r in reqs], samples, settings))
            cache.put([(keys[i], r) for i, r in zip(idx, res)])
            bar.update(len(idx))
    return [cache.results[k] for k in keys]


def summarize(task: Task, results: list[dict], shots: int, samples: int) -> dict[str, Any]:
    """Mean of every numeric per-item metric; `score` is the headline one, in %."""
    names = [k for k, v in results[0].items() if isinstance(v, float)] if results else [task.metric]
    metrics = {k: sum(r[k] for r in results) / max(len(results), 1) for k in names}
    return {"metric": task.metric, "score": 100 * metrics[task.metric], "metrics": metrics, "n": len(results),
            "shots": shots, "samples": samples}


def run_eval(lm: LM, tasks: Sequence[str], data: Mapping[str, str | Path], *, output: str | Path,
             fewshot: Mapping[str, str | Path] | None = None, shots: Mapping[str, int] | None = None,
             samples: Mapping[str, int] | None = None, limit: int | None = None,
             settings: Settings | None = None, chunk: int = 32, progress: bool = True) -> dict[str, Any]:
    """Evaluate `lm` on `tasks` (data: task -> file) and write results.json, results.md and results.png.

    `shots` / `samples` override the paper's protocol per task (e.g. {"gsm8k": 1} for a quick greedy run).
    """
    from .report import write_report

    settings = settings or Settings()
    out_dir = Path(output)
    cache = ResultCache(out_dir / "cache.jsonl")
    report: dict[str, Any] = {"model": settings.model, "settings": asdict(settings), "limit": limit, "tasks": {}}
    for name in tasks:
        task = get_task(name)
        if name not in data:
            raise ValueError(f"no data file for {name}: pass --data {name}=PATH ({task.expects})")
        k = (shots or {}).get(name, task.shots)
        n = (samples or {}).get(name, task.samples)
        reqs = load_requests(task, data[name], fewshot=(fewshot or {}).get(name), shots=k, limit=limit)
        results = evaluate_task(lm, task, reqs, cache, settings, shots=k, samples=n, chunk=chunk, progress=progress)
        report["tasks"][name] = {**summarize(task, results, k, n), "data": str(data[name])}
    write_report(report, out_dir)
    return report


def perplexity(lm: LM, text: str) -> dict[str, float]:
    """Rolling perplexity of a text (BOS + tokens), and bits per UTF-8 byte, which compares across tokenizers."""
    ids = [lm.tokenizer.bos_id, *lm.tokenizer.encode(text, bos=False)]
    lps = sequence_logprobs(lm.model, ids)
    if not lps:
        raise ValueError("perplexity needs a non-empty text")
    nll = -math.fsum(lps)
    return {"tokens": len(lps), "nll": nll, "perplexity": math.exp(nll / len(lps)),
            "bits_per_byte": nll / math.log(2) / len(text.encode("utf-8"))}
