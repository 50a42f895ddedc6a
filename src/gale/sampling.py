"""Per-sequence sampling parameters, seeded sampling and log-probabilities."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# What the engine can compute, checked here for the Python API and the server alike.
SEED_RANGE = (-(2**63), 2**64 - 1)  # torch.Generator.manual_seed takes 64 bits (negative ones wrap around)
MIN_TEMPERATURE = 1e-4  # below it (but above 0, greedy) logits / temperature may overflow fp32
MAX_TOP_K = 2**31 - 1
MAX_LOGPROBS = 20
MAX_STOPS, MAX_STOP_CHARS = 16, 256


class ParamError(ValueError):
    """An invalid sampling parameter; `param` names it (the server reports it in its 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How one sequence picks its tokens. `temperature=0` is greedy; a seed makes sampling repeatable."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the top k

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise ParamError (a ValueError) naming the offending field: the server maps it to a 400."""
        t, lo, hi = self.temperature, *SEED_RANGE
        checks = [
            ("max_tokens", _integer(self.max_tokens) and self.max_tokens >= 1, "must be an integer >= 1"),
            ("temperature", _number(t) and (t == 0 or MIN_TEMPERATURE <= t),
             f"must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}"),
            ("top_k", _integer(self.top_k) and 0 <= self.top_k <= MAX_TOP_K,
             f"must be an integer in [0, {MAX_TOP_K}] (0 = off)"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "must be a number in (0, 1]"),
            ("seed", self.seed is None or (_integer(self.seed) and lo <= self.seed <= hi),
             f"must be an integer in [{lo}, {hi}] (64 bits, with the offsets n > 1 adds)"),
            ("stop", isinstance(self.stop, list) and len(self.stop) <= MAX_STOPS
             and all(isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS for x in self.stop),
             f"must be at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters"),
            ("stop_token_ids", isinstance(self.stop_token_ids, list) and all(
                _integer(x) and x >= 0 for x in self.stop_token_ids), "must be a list of token ids"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "must be true or false"),
            ("logprobs", self.logprobs is None or (_integer(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"must be an integer in [0, {MAX_LOGPROBS}]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ParamError(name, f"{name}={getattr(self, name)!r} {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: object) -> bool:
    """A finite int or float (no bool, NaN, inf, nor an int too large for a float)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus filtering of one row of logits `[V]` (-inf outside)."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix that reaches top_p
        drop[0] = False  # and the top token always, even for a top_p that rounds to 0 in fp32
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """A random next token from one row of fp32 logits `[V]` (greedy rows take the argmax, batched, instead)."""
    probs = filter_logits(logits, p.temperature, p.top_k, p.top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, chosen: int, k: int) -> TokenLogprob:
    """Model log-probabilities (before temperature and filtering, as OpenAI reports them)."""
    lp = logits.log_softmax(-1)
    top = torch.topk(lp, k) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenLogprob(chosen, float(lp[chosen]), pairs)
