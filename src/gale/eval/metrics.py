"""Answer normalisation, extraction and voting: the pure functions every benchmark's score rests on.

Kept free of torch and of the model so they can be tested on crafted strings, and so a change to
one rule (e.g. how MATH answers are compared) is visible in one place.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD/TriviaQA normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, golds: Sequence[str]) -> bool:
    """True when the prediction equals any gold alias after normalisation (empty answers never match)."""
    pred = normalize_answer(prediction)
    return bool(pred) and any(pred == normalize_answer(g) for g in golds)


def majority(answers: Sequence[str | None]) -> str | None:
    """The most frequent extracted answer; ties go to the one seen first, unparsable samples (None) do not vote."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    top = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == top)


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def choice_metrics(totals: Sequence[float], continuations: Sequence[str], label: int) -> dict[str, float]:
    """acc: highest log-likelihood wins; acc_norm: log-likelihood per character of the continuation (so long
    endings are not penalised for their length, as in lm-evaluation-harness)."""
    norm = [t / max(len(c), 1) for t, c in zip(totals, continuations)]
    return {"acc": float(argmax(totals) == label), "acc_norm": float(argmax(norm) == label)}


# -- numbers (GSM8K) ------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '$7.' -> '7', '3.0' -> '3'; None when there is no number."""
    found = _NUMBER.findall(text.replace("$", ""))
    if not found:
        return None
    s = found[-1].replace(",", "")
    try:
        value = float(s)
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def extract_gsm8k(output: str) -> str | None:
    """The model's final number: after '####' or 'The answer is' when present, else the last number."""
    for marker in ("####", "The answer is", "the answer is"):
        if marker in output:
            tail = output.rsplit(marker, 1)[1]
            if (n := normalize_number(tail.split("\n")[0])) is not None:
                return n
    return normalize_number(output)


# -- LaTeX (MATH) ---------------------------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces; also '\\boxed 5'."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    rest = text[i:].split("{", 1)
    if text[i:].startswith("\\boxed ") and (len(rest) == 1 or "$" in rest[0]):
        return text[i + 7 :].split("$")[0].strip()
    if len(rest) == 1:
        return None
    depth, body = 1, rest[1]
    for j, ch in enumerate(body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return body[:j]
    return None


_UNITS = re.compile(r"\\(?:text|mbox|mathrm)\{\s*(?:units?|cm|m|km|inches|inch|feet|ft|degrees?|cents?|dollars?)\s*\}")


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}
    return re.sub(r"\\frac(?!\{)(\w)(\w|\{[^}]*\})?", lambda m: f"\\frac{{{m[1]}}}{{{(m[2] or '').strip('{}')}}}", s)


def normalize_math(answer: str) -> str:
    """Hendrycks et al.'s MATH answer normalisation (strip_string): spacing, \\left/\\right, dfrac, units,
    degrees, dollars, leading zeros of decimals, 'x =' prefixes, a/b -> \\frac{a}{b}."""
    s = answer.strip().replace("\n", "").replace("\\!", "")
    s = s.replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = _UNITS.sub("", s)
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if re.fullmatch(r"\s*[a-zA-Z]\s*=.*", s):
        s = s.split("=", 1)[1]
    s = _fix_fracs(s).replace(" ", "")
    if s == "0.5":
        s = "\\frac{1}{2}"
    if m := re.fullmatch(r"(-?\d+)/(\d+)", s):
        s = f"\\frac{{{m[1]}}}{{{m[2]}}}"
    return s.rstrip(".")


_FINAL = re.compile(r"final answer is\s*(.+?)\s*(?:\.\s|\.?$|\n)", re.IGNORECASE | re.MULTILINE)


def extract_math(output: str) -> str | None:
    """The model's answer: the last \\boxed{}, else Minerva's 'The final answer is X', normalised."""
    ans = last_boxed(output)
    if ans is None and (found := _FINAL.findall(output)):
        ans = found[-1].strip().strip("$")
    return None if ans is None else normalize_math(ans)
