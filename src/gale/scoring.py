"""Log-likelihood scoring: what evaluation, moderation and the server's prompt logprobs (echo) share.

Each (context, continuation) pair is one sequence, and many of them are packed into one forward.
Identical inputs (e.g. a question scored against single-token answers A/B/C/D) are computed once, and
inputs that begin alike (few-shot examples shared by every question of a task) have that beginning
computed once: its keys/values are copied into each sequence's slot of a cache, and only the rest is run.
Prefill GEMMs stay fp32 here (`quant.exact_gemms`), even where generation takes fp16 ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .cache import RollingCache, buffer_capacity, plan
from .model import Transformer
from .prefix import common_prefix_len
from .quant import exact_gemms
from .sampling import TokenLogprob

MIN_SHARED = 32  # tokens a group of inputs must share before their common beginning is computed once


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


@exact_gemms()
@torch.inference_mode()
def score_continuations(
    model: Transformer,
    pairs: list[tuple[list[int], list[int]]],
    *,
    max_batch_tokens: int = 4096,
    progress: bool = False,
    min_shared: int = MIN_SHARED,
    max_len: int | None = None,
) -> list[Score]:
    """Log-probability of each continuation given its context, which is truncated on the left to fit `max_len`
    input positions (default the model's max_seq_len). An empty continuation scores 0 (lm-eval's convention)."""
    limit = max_len or model.args.max_seq_len
    inputs: dict[tuple[int, ...], int] = {}  # distinct input sequence -> row
    jobs: list[tuple[int | None, int, list[int]]] = []  # (row, first target index in the input, targets)
    for ctx, cont in pairs:
        if not cont:
            jobs.append((None, 0, []))
            continue
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
        if row is not None:
            wanted.setdefault(row, set()).update(range(start, start + len(targets)))
    logprob_rows: dict[int, dict[int, torch.Tensor]] = {}

    def run(rows: list[int], shared: int, cache: RollingCache | None) -> None:
        """One forward over rows `rows` from position `shared` on (the cache holds what comes before)."""
        lens = [len(keys[r]) - shared for r in rows]
        tokens = torch.tensor([t for r in rows for t in keys[r][shared:]], device=model.device)
        if cache is None:
            meta = plan(lens, [0] * len(rows), model.args.sliding_window, device=model.device)
        else:
            meta = cache.prepare(list(range(len(rows))), lens)
        h = model.hidden_states(tokens, meta, cache)
        offsets = torch.tensor([-shared] + lens).cumsum(0).tolist()  # packed index of position p: offset + p
        picks = [(r, p) for r in rows for p in sorted(wanted[r])]
        index = torch.tensor([off + p for r, off in zip(rows, offsets) for p in sorted(wanted[r])], device=model.device)
        for (r, p), lp in zip(picks, model.logits(h[index]).log_softmax(-1)):
            logprob_rows.setdefault(r, {})[p] = lp
        bar.update(len(rows))

    bar = tqdm(total=len(keys), desc="scoring", unit="seq", disable=not progress)
    groups, alone = _shared_groups(keys, {r: min(w) for r, w in wanted.items()}, min_shared, model)
    lengths = [len(k) for k in keys]
    for rows in _batches(lengths, sorted(alone, key=lambda r: -lengths[r]), max_batch_tokens):
        run(rows, 0, None)
    for shared, members in groups:
        prefix = RollingCache(model.args, 1, device=model.device, dtype=model.dtype, initial=shared)
        model.hidden_states(torch.tensor(keys[members[0]][:shared], device=model.device),
                            prefix.prepare([0], [shared]), prefix)
        shared_k, shared_v = prefix.read(0, 0, shared)
        # Each row holds its own copy of the shared keys: a batch's K/V positions are bounded like its tokens.
        members.sort(key=lambda r: -lengths[r])
        for rows in _batches(lengths, members, max(max_batch_tokens, lengths[members[0]])):
            cache = RollingCache(model.args, len(rows), device=model.device, dtype=model.dtype,
                                 initial=lengths[rows[0]])
            for slot in range(len(rows)):
                cache.load(slot, shared_k, shared_v)
            run(rows, shared, cache)
    bar.close()

    out = []
    for row, start, targets in jobs:
        dists = [logprob_rows[row][start + j] for j in range(len(targets))] if targets else []
        lps = [float(d[t]) for d, t in zip(dists, targets)]
        out.append(Score(lps, all(int(d.argmax()) == t for d, t in zip(dists, targets))))
    return out


def _shared_groups(keys: list[tuple[int, ...]], first_wanted: dict[int, int], min_shared: int,
                   model: Transformer) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Rows whose inputs share at least `min_shared` leading tokens, as (shared length, rows) groups (runs of
    the inputs in sorted order), and the rest. The shared part stops before any position whose logits a
    row needs, and within the cache's capacity (there a prefix's keys are a plain copy)."""
    limit = buffer_capacity(model.args)
    order = sorted(range(len(keys)), key=lambda r: keys[r])
    groups, alone, run, shared = [], [], order[:1], limit
    for prev, r in zip(order, [*order[1:], None]):
        if r is not None:
            common = min(common_prefix_len(keys[prev], keys[r]), first_wanted[prev], first_wanted[r])
            if min(shared, common) >= min_shared:
                run, shared = run + [r], min(shared, common)
                continue
        if len(run) > 1:
            groups.append((shared, run))
        else:
            alone += run
        run, shared = [r], limit
    return groups, alone


@exact_gemms()
@torch.inference_mode()
def sequence_logprobs(model: Transformer, ids: list[int], *, chunk: int | None = None) -> list[float]:
    """Log-probability of ids[1:], each given everything before it that the model can see.

    A sliding-window model reads the text through its rolling cache in chunks of W: exact at any
    length, memory flat. A full-attention model uses overlapping windows of its context (each
    scored token keeps at least half a context of history).
    """
    return [lp for logp, targets in _next_token_logprobs(model, ids, chunk)
            for lp in logp.gather(1, targets[:, None])[:, 0].tolist()]


@exact_gemms()
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
