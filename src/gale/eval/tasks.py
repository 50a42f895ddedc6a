"""The paper's benchmarks (Mistral 7B, Table 2): how each turns an upstream record into a scored request.

Three request kinds cover them all: `Choice` (pick the option with the highest log-likelihood),
`Generate` (sample, extract an answer, majority-vote, compare) and `Code` (generate, run the tests).
Few-shot examples are the same requests rendered with their reference answer, so a task defines
its prompt once. Prompts follow lm-evaluation-harness / Minerva / Codex conventions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .data import DataError, Record, load_records
from .metrics import exact_match, extract_gsm8k, extract_math, gsm8k_strict, last_boxed, normalize_gsm8k, normalize_math

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Choice:
    """Options as (context, continuation): usually one context and several continuations; WinoGrande's
    partial scoring has one context per option and a shared continuation."""

    options: tuple[tuple[str, str], ...]
    label: int

    def shot(self) -> str:
        return "".join(self.options[self.label])

    def with_prefix(self, prefix: str) -> Choice:
        return Choice(tuple((prefix + c, x) for c, x in self.options), self.label)


@dataclass(frozen=True)
class Generate:
    prompt: str
    answer: str  # the reference answer as written after the prompt in a few-shot example
    golds: tuple[str, ...] = ()

    def shot(self) -> str:
        return self.prompt + self.answer

    def with_prefix(self, prefix: str) -> Generate:
        return replace(self, prompt=prefix + self.prompt)


@dataclass(frozen=True)
class Code(Generate):
    """The program run for a completion is head + completion + tail (the tail holds the tests)."""

    head: str = ""
    tail: str = ""

    def program(self, completion: str) -> str:
        return self.head + completion + self.tail


Request = Choice | Generate | Code


def _first_line(output: str) -> str:
    return output.strip().split("\n")[0].strip()


def _same(pred: str | None, golds: Sequence[str]) -> bool:
    return pred is not None and pred in golds


def _no_header(rec: Record) -> str:
    return ""


def _no_group(rec: Record) -> None:
    return None


@dataclass(frozen=True)
class Task:
    name: str
    layouts: tuple[tuple[str, ...], ...]  # accepted top-level field sets
    expects: str  # the layout, nested fields included, for error messages
    build: Callable[[Record], Request]
    metric: str  # the headline metric, the one compared with the paper
    shots: int = 0
    header: Callable[[Record], str] = _no_header  # once, before the few-shot examples
    group: Callable[[Record], object] = _no_group  # few-shot examples come from records of the same group
    samples: int = 1  # generations per prompt; > 1 means majority vote (maj@k) at `temperature`
    max_tokens: int = 0
    stop: tuple[str, ...] = ()
    extract: Callable[[str], str | None] = _first_line
    match: Callable[[str | None, Sequence[str]], bool] = exact_match
    chat: Callable[[Code], tuple[str, str]] | None = None  # instruct models: (user message, answer's start)

    @property
    def kind(self) -> str:
        return {"acc": "choice", "acc_norm": "choice", "pass@1": "code"}.get(self.metric, "generate")


def _index(value: object, labels: Sequence[str] = LETTERS) -> int:
    """A gold label as an index: 2, "2" (ARC's numeric keys are labels too), "C"."""
    s = str(value).strip()
    if s in labels:
        return list(labels).index(s)
    return int(s)


# -- multiple choice --------------------------------------------------------------------------------------
def _mmlu_question(rec: Record) -> str:
    opts = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(rec["choices"]))
    return f"{rec['question'].strip()}\n{opts}Answer:"


def _mmlu(rec: Record) -> Choice:
    ctx = _mmlu_question(rec)
    return Choice(tuple((ctx, f" {LETTERS[i]}") for i in range(len(rec["choices"]))), _index(rec["answer"]))


def _mmlu_header(rec: Record) -> str:
    subject = str(rec.get("subject", "")).replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(rec: Record) -> Choice:
    label = rec.get("activity_label")
    ctx = _hellaswag_clean(f"{label}: {rec['ctx']}" if label else rec["ctx"])
    return Choice(tuple((ctx, " " + _hellaswag_clean(e)) for e in rec["endings"]), int(rec["label"]))


def _winogrande(rec: Record) -> Choice:
    """Partial scoring: the blank filled with each option is context; only the rest of the sentence is scored."""
    s = rec["sentence"]
    i = s.index("_")
    rest = " " + s[i + 1 :].strip()
    return Choice(((s[:i] + rec["option1"], rest), (s[:i] + rec["option2"], rest)), int(rec["answer"]) - 1)


def _piqa(rec: Record) -> Choice:
    ctx = f"Question: {rec['goal']}\nAnswer:"
    return Choice(((ctx, " " + rec["sol1"]), (ctx, " " + rec["sol2"])), int(rec["label"]))


def _arc(rec: Record) -> Choice:
    q = rec["question"]
    if isinstance(q, dict):  # AI2's own layout
        stem, labels, texts = q["stem"], [c["label"] for c in q["choices"]], [c["text"] for c in q["choices"]]
    else:  # Hugging Face allenai/ai2_arc
        stem, labels, texts = q, list(rec["choices"]["label"]), list(rec["choices"]["text"])
    ctx = f"Question: {stem}\nAnswer:"
    return Choice(tuple((ctx, " " + t) for t in texts), _index(rec["answerKey"], labels))


# -- generation -------------------------------------------------------------------------------------------
def _aliases(answer: object) -> tuple[str, ...]:
    """NQ-open: a list; TriviaQA (rc.nocontext): {value, aliases, ...}; also a bare string."""
    if isinstance(answer, str):
        return (answer,)
    if isinstance(answer, dict):
        return tuple(dict.fromkeys([answer["value"], *answer.get("aliases", [])]))
    golds = tuple(str(a) for a in answer)
    if not golds:
        raise ValueError("empty answer list")
    return golds


def _qa(rec: Record) -> Generate:
    golds = _aliases(rec["answer"])
    return Generate(f"Q: {rec['question'].strip()}\nA:", " " + golds[0], golds)


def _qa_header(rec: Record) -> str:
    return "Answer these questions:\n\n"


def _gsm8k(rec: Record) -> Generate:
    if gsm8k_strict(rec["answer"]) is None:
        raise ValueError("answer has no '#### N' final line")
    return Generate(f"Question: {rec['question'].strip()}\nAnswer:", " " + rec["answer"].strip(),
                    (normalize_gsm8k(rec["answer"]),))  # lm-eval's target: all of it, normalised to its number


def _math(rec: Record) -> Generate:
    boxed = last_boxed(rec["solution"])
    if boxed is None:
        raise ValueError("solution has no \\boxed{} answer")
    return Generate(f"Problem:\n{rec['problem'].strip()}\n\nSolution:", " " + rec["solution"].strip(),
                    (normalize_math(boxed),))


# -- code -------------------------------------------------------------------------------------------------
def _humaneval(rec: Record) -> Code:
    return Code(rec["prompt"], rec["canonical_solution"], head=rec["prompt"],
                tail=f"\n\n{rec['test']}\n\ncheck({rec['entry_point']})\n")


def _humaneval_chat(req: Code) -> tuple[str, str]:
    """Ask for the function and open a code block for the answer. An instruct model writes the whole function;
    the program is still prompt + answer + tests (the answer's definition replaces the prompt's stub, and the
    prompt's imports and helpers stay). Prefilling the prompt itself makes small instruct models close the
    block at once, since the prompt looks like a finished (docstring-only) function."""
    return f"Complete the following Python function.\n\n```python\n{req.prompt}```", "```python\n"


def _mbpp(rec: Record) -> Code:
    tests = "\n".join(rec["test_list"])
    text = rec.get("text") or rec["prompt"]  # the sanitized split calls it "prompt"
    prompt = f"You are an expert Python programmer, and here is your task: {text} " \
             f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    setup = "\n".join([*rec.get("test_imports", []), rec.get("test_setup_code", "")])
    return Code(prompt, rec["code"].strip() + "\n[DONE]", head=setup + "\n", tail=f"\n\n{tests}\n")


_ARC = (("question", "choices", "answerKey"), ("question", "answerKey"))
_ARC_DOC = "question{stem, choices[{label, text}]}, answerKey or question, choices{text, label}, answerKey"
_QA = (("question", "answer"),)
_CODE_STOP = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(")

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("mmlu", (("question", "choices", "answer"),), "question, choices[4], answer (0-3 or A-D), subject",
         _mmlu, "acc", shots=5, header=_mmlu_header, group=lambda r: r.get("subject")),
    Task("hellaswag", (("ctx", "endings", "label"),), "ctx, endings[4], label", _hellaswag, "acc_norm"),
    Task("winogrande", (("sentence", "option1", "option2", "answer"),),
         "sentence (with _), option1, option2, answer (1 or 2)", _winogrande, "acc"),
    Task("piqa", (("goal", "sol1", "sol2", "label"),), "goal, sol1, sol2, label (0 or 1)", _piqa, "acc_norm"),
    Task("arc_easy", _ARC, _ARC_DOC, _arc, "acc_norm"),
    Task("arc_challenge", _ARC, _ARC_DOC, _arc, "acc_norm"),
    Task("naturalquestions", _QA, "question, answer[list of aliases]", _qa, "em", shots=5, header=_qa_header,
         max_tokens=32, stop=("\n",)),
    Task("triviaqa", _QA, "question, answer (list, or {value, aliases})", _qa, "em", shots=5, header=_qa_header,
         max_tokens=32, stop=("\n",)),
    Task("humaneval", (("task_id", "prompt", "canonical_solution", "test", "entry_point"),),
         "task_id, prompt, canonical_solution, test, entry_point", _humaneval, "pass@1", max_tokens=512,
         stop=_CODE_STOP, chat=_humaneval_chat),
    Task("mbpp", (("text", "code", "test_list"), ("prompt", "code", "test_list")),
         "task_id, text (or prompt), code, test_list[, test_setup_code]", _mbpp, "pass@1", shots=3,
         max_tokens=512, stop=("[DONE]",)),
    Task("gsm8k", (("question", "answer"),), "question, answer (ending '#### N')", _gsm8k, "maj@8", shots=8,
         samples=8, max_tokens=256, stop=("\n\n", "Question:"), extract=extract_gsm8k, match=_same),
    Task("math", (("problem", "solution"),), "problem, solution (with \\boxed{answer})", _math, "maj@4", shots=4,
         samples=4, max_tokens=512, stop=("Problem:",), extract=extract_math, match=_same),
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)} (and `perplexity`)")
    return TASKS[name]


def _build_all(task: Task, records: list[Record], path: str | Path) -> list[Request]:
    out = []
    for n, rec in enumerate(records, 1):
        try:
            out.append(task.build(rec))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise DataError(f"{path}: record {n}: {task.name} expects {task.expects} ({type(e).__name__}: {e})") from e
    return out


def load_requests(task: Task, path: str | Path, *, fewshot: str | Path | None = None, shots: int | None = None,
                  limit: int | None = None) -> list[Request]:
    """Requests for the first `limit` records, each with its few-shot examples in front.

    Examples are the first `shots` records of the `fewshot` file (MMLU: of the same subject), or, with no
    such file, of the evaluated file itself, never the evaluated record.
    """
    shots = task.shots if shots is None else shots
    records = load_records(path, task.layouts, task.name)
    mine = records[: limit or None]
    # Without a few-shot file every record may serve as an example, so all of them are built.
    built = _build_all(task, records if shots and not fewshot else mine, path)
    pool_records = load_records(fewshot, task.layouts, task.name) if fewshot else records
    pool = _build_all(task, pool_records, fewshot) if fewshot and shots else built
    by_group: dict[object, list[int]] = {}
    for j, rec in enumerate(pool_records if shots else []):
        if len(by_group.setdefault(task.group(rec), [])) <= shots:
            by_group[task.group(rec)].append(j)
    out = []
    for i, (rec, req) in enumerate(zip(mine, built)):
        chosen = [j for j in by_group.get(task.group(rec), []) if fewshot or j != i][:shots]
        out.append(req.with_prefix(task.header(rec) + "".join(pool[j].shot() + "\n\n" for j in chosen)))
    return out
