"""Log-likelihood scoring: what evaluation, moderation and the server's prompt logprobs (echo) share.

Scoring needs no cache: each (context, continuation) pair is one fresh sequence, and many of them
are packed into one forward. Identical inputs (e.g. a question scored against single-token answers
A/B/C/D) are computed once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .cache import RollingCache, plan
from .model import Transformer
from .sampling import TokenLogprob


@dataclass
class Score:
    logprobs: list[float]  # one per continuation token
    greedy: bool  # every continuation token was the argmax

    @property
    def total(self) -> float:
        return sum(self.logprobs)


def _batches(lengths: list[int], order: list[int], max_tokens: int) -> Iterable[list[int]]:
    batch, used = [], 0
    for i in order:
        if batch and used + lengths[i] > max_tokens:
            yield batch
            batch, used = [], 0
        batch.append(i)
        used += lengths[i]
    if batch:
        yield batch


@torch.inference_mode()
def score_continuations(
    model: Transformer,
    pairs: list[tuple[list[int], list[int]]],
    *,
    max_batch_tokens: int = 4096,
    progress: bool = False,
) -> list[Score]:
    """Log-probability of each continuation given its context (context is truncated on the left to fit)."""
    limit = model.args.max_seq_len
    inputs: dict[tuple[int, ...], int] = {}  # distinct input sequence -> row
    jobs = []  # (row, first target index within the input, targets)
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("a continuation is empty")
        ids = (list(ctx) + list(cont))[-(limit + 1) :]
        if len(ids) < 2:
            raise ValueError("scoring needs at least one token of context (add BOS)")
        n_cont = min(len(cont), len(ids) - 1)
        key = tuple(ids[:-1])
        row = inputs.setdefault(key, len(inputs))
        jobs.append((row, len(key) - n_cont, ids[-n_cont:]))

    keys = list(inputs)
    # Every position a job reads, per row, so logits are computed only where needed.
    wanted: dict[int, set[int]] = {}
    for row, start, targets in jobs:
        wanted.setdefault(row, set()).update(range(start, start + len(targets)))
    lengths = [len(k) for k in keys]
    order = sorted(range(len(keys)), key=lambda r: -lengths[r])
    logprob_rows: dict[int, dict[int, torch.Tensor]] = {}

    bar = tqdm(total=len(keys), desc="scoring", unit="seq", disable=not progress)
    for rows in _batches(lengths, order, max_batch_tokens):
        tokens = torch.tensor([t for r in rows for t in keys[r]], device=model.device)
        meta = plan([lengths[r] for r in rows], [0] * len(rows), model.args.sliding_window, device=model.device)
        h = model.hidden_states(tokens, meta, None)
        offsets = torch.tensor([0] + [lengths[r] for r in rows]).cumsum(0).tolist()
        picks = [(r, p) for r, off in zip(rows, offsets) for p in sorted(wanted[r])]
        index = torch.tensor([off + p for r, off in zip(rows, offsets) for p in sorted(wanted[r])], device=model.device)
        logp = model.logits(h[index]).log_softmax(-1)
        for (r, p), lp in zip(picks, logp):
            logprob_rows.setdefault(r, {})[p] = lp
        bar.update(len(rows))
    bar.close()

    out = []
    for row, start, targets in jobs:
        dists = [logprob_rows[row][start + j] for j in range(len(targets))]
        lps = [float(d[t]) for d, t in zip(dists, targets)]
        out.append(Score(lps, all(int(d.argmax()) == t for d, t in zip(dists, targets))))
    return out


@torch.inference_mode()
def sequence_logprobs(model: Transformer, ids: list[int], *, chunk: int | None = None) -> list[float]:
    """Log-probability of ids[1:], each given everything before it that the model can see.

    A sliding-window model reads the text through its rolling cache in chunks of W: exact at any
    length, memory flat. A full-attention model uses overlapping windows of its context (each
    scored token keeps at least half a context of history).
    """
    return [lp for logp, targets in _next_token_logprobs(model, ids, chunk)
            for lp in logp.gather(1, targets[:, None])[:, 0].tolist()]


@torch.inference_mode()
def prompt_logprobs(model: Transformer, ids: list[int], top: int) -> list[TokenLogprob]:
    """Per token of ids[1:]: its log-probability and the `top` most likely tokens there (the server's echo)."""
    out = []
    for logp, targets in _next_token_logprobs(model, ids, None):
        best = logp.topk(top, dim=-1) if top else None
        for j, t in enumerate(targets.tolist()):
            alts = list(zip(best.indices[j].tolist(), best.values[j].tolist())) if best is not None else []
            out.append(TokenLogprob(t, float(logp[j, t]), alts))
    return out


def _next_token_logprobs(model: Transformer, ids: list[int], chunk: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    """(log-softmax rows `[n, vocab]`, the tokens they predict `[n]`), piece by piece over ids[1:]."""
    args = model.args
    if len(ids) < 2:
        return
    if args.sliding_window is not None:
        chunk = chunk or args.sliding_window
        cache = RollingCache(args, 1, device=model.device, dtype=model.dtype)
        for s in range(0, len(ids) - 1, chunk):
            piece = ids[s : min(s + chunk, len(ids) - 1)]
            logits = model(torch.tensor(piece, device=model.device), cache.prepare([0], [len(piece)]), cache)
            yield logits.log_softmax(-1), torch.tensor(ids[s + 1 : s + 1 + len(piece)], device=model.device)
        return
    window = args.max_seq_len
    pos = 1
    while pos < len(ids):
        end = min(len(ids), window if pos == 1 else pos + window // 2)
        a = max(0, end - window)
        logits = model(torch.tensor(ids[a : end - 1], device=model.device))[pos - 1 - a :]
        yield logits.log_softmax(-1), torch.tensor(ids[pos:end], device=model.device)
        pos = end
