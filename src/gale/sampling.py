"""Per-sequence sampling parameters, seeded sampling and log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
        """Raise ValueError naming the offending field (the server maps it to a 400)."""
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "must be an integer >= 1"),
            ("temperature", _number(self.temperature) and self.temperature >= 0, "must be a number >= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be an integer >= 0 (0 = off)"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "must be a number in (0, 1]"),
            ("seed", self.seed is None or isinstance(self.seed, int), "must be an integer"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "must be an integer in [0, 20]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ParamError(name, f"{name}={getattr(self, name)!r} {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN


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
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """Next token of each row of `[B, V]` fp32 logits."""
    out = logits.argmax(-1).tolist()
    for i, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            probs = filter_logits(logits[i], p.temperature, p.top_k, p.top_p).softmax(-1)
            out[i] = int(torch.multinomial(probs, 1, generator=g))
    return out


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
