"""Prefill attention that computes only the scores a sliding window lets each query see.

The dense path attends a chunk of C queries over `[buffer ; chunk]` under a mask: with C = W that is W x 2W
scores, about half of them masked, the same work as full attention at 16k. Here each sequence's keys are laid
out in position order (the rolling buffer unrolled, `RollingCache.history`: at most two ring segments, then the
chunk's own keys) and its queries are cut into blocks of `QUERY_BLOCK`; a block attends to the one contiguous
key range its queries' windows reach (at most W + block - 1 keys), so keys no query of the block sees are never
read, and a block whose range is all visible (a single query inside the window) gets no mask at all. The band
mask of the other blocks hides block - 1 keys on each side of the range: the work is C x (W + block - 1)
instead of C x (buffer + C).

Same arithmetic as the dense path (fp32 softmax of SDPA over the keys a query sees; masked keys add exp(-inf)
= 0 there), so the numbers agree to rounding. It runs on PyTorch's SDPA over contiguous slices, so it is the
same code on any device and needs no compilation. On a GPU, SDPA dispatches each block to its flash or
memory-efficient kernel (they take a float band mask); FlexAttention with a sliding-window BlockMask would
skip the masked tiles inside the kernel too, but it needs `torch.compile` and could not be measured here (no
GPU in this session), so it is not used: see benchmarks/NOTES.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import BatchMeta, RollingCache

# Queries per block, measured on the 2-core CPU (benchmarks/NOTES.md): a block computes block - 1 masked
# scores per query, but torch's CPU flash kernel tiles 768 queries and more by 256 rows (fewer: by 64 or 32),
# which runs ~20% faster per score. A W=4096 chunk by blocks of 768: 1.56-1.73x the dense path in four runs,
# 192-512: 1.48-1.89x, noisier.
QUERY_BLOCK = 768


def pays(meta: BatchMeta, block: int | None) -> bool:
    """Whether the block path saves work for this forward: only a chunk longer than one block has keys that
    some of its queries' windows miss (one block's range is its whole [buffer ; chunk], the buffer holding no
    more than the window), so shorter chunks and decode steps keep the dense path."""
    return block is not None and not meta.decode and meta.max_len > block


def block_ranges(n_queries: int, n_keys: int, window: int | None, block: int) -> list[tuple[int, int, int, int]]:
    """`(q0, q1, k0, k1)` per query block: queries q0..q1-1 attend keys k0..k1-1.

    Keys are in position order and their last `n_queries` are the queries' own, so query i sits at key index
    `n_keys - n_queries + i` and sees the `window` keys ending there (all keys before it without a window).

    Worked example: window 4, 4 buffered keys (positions 2..5) then a chunk of 6 queries (positions 6..11):
    n_keys = 10, key j holds position j + 2. With block = 3, queries 0..2 (positions 6..8) reach positions
    3..8, keys 1..6: `(0, 3, 1, 7)`; queries 3..5 (positions 9..11) reach 6..11: `(3, 6, 4, 10)`.
    """
    own = n_keys - n_queries
    ranges = []
    for q0 in range(0, n_queries, block):
        q1 = min(q0 + block, n_queries)
        k0 = 0 if window is None else max(0, own + q0 - window + 1)
        ranges.append((q0, q1, k0, own + q1))
    return ranges


def band_mask(
    lag: int, n_queries: int, n_keys: int, window: int | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """Additive mask `[n_queries, n_keys]` (0 = visible, -inf = hidden) for queries whose own keys start `lag`
    keys into the range (query r is key `lag + r`, the last query the last key); None when every key of the
    range is visible to every query.
    It depends on these three numbers only, so the interior blocks of a chunk share one.

    Example: window 4, lag 3, 3 queries over 6 keys: key 0 is visible to query 0 only, key 5 to query 2 only:
    rows [0 0 0 0 - -], [- 0 0 0 0 -], [- - 0 0 0 0] (- = -inf).
    """
    causal = n_queries > 1  # the range ends at the last query's own key: later ones for the others
    windowed = window is not None and lag + n_queries - window > 0  # keys before the last query's window
    if not (causal or windowed):
        return None
    q = torch.arange(lag, lag + n_queries, device=device)[:, None]
    k = torch.arange(n_keys, device=device)[None, :]
    hidden = k > q
    if window is not None:
        hidden |= k <= q - window
    return torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))


def window_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    window: int | None,
    block: int,
    masks: dict[tuple, torch.Tensor | None],
) -> torch.Tensor:
    """One sequence's attention by query blocks: q `[C, heads, d]`, keys/values `[kv_heads, K, d]` in position
    order ending with the C queries' own. Returns `[C, heads, d]`. `masks` memoizes `band_mask` by shape."""
    n_q, n_k = q.shape[0], keys.shape[1]
    qt = q.transpose(0, 1)[None]  # [1, heads, C, d]
    outs = []
    for q0, q1, k0, k1 in block_ranges(n_q, n_k, window, block):
        shape = (n_k - n_q + q0 - k0, q1 - q0, k1 - k0)
        if shape not in masks:
            masks[shape] = band_mask(*shape, window, q.dtype, q.device)
        outs.append(F.scaled_dot_product_attention(
            qt[:, :, q0:q1], keys[None, :, k0:k1], values[None, :, k0:k1], masks[shape], enable_gqa=True))
    return torch.cat(outs, dim=2)[0].transpose(0, 1)


def prefill_by_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: BatchMeta,
    cache: RollingCache | None,
    layer: int,
    window: int | None,
    block: int,
) -> torch.Tensor:
    """Packed q `[N, heads, d]`, k/v `[N, kv_heads, d]` -> packed attention output `[N, heads, d]`, one
    sequence at a time (no padding: each keeps its own length), each over its buffer then its own chunk."""
    outs, offset = [], 0
    for b, n in enumerate(meta.seqlens):
        rows = slice(offset, offset + n)
        offset += n
        keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        if meta.buffer_len and meta.starts[b]:
            old_k, old_v = cache.history(layer, meta.slot_ids[b], meta.starts[b])
            keys = torch.cat((*old_k, keys), dim=1).to(q.dtype)
            values = torch.cat((*old_v, values), dim=1).to(q.dtype)
        outs.append(window_attention(q[rows], keys, values, window, block, meta.block_masks))
    return torch.cat(outs)


def scores_computed(meta: BatchMeta, window: int | None, block: int | None) -> int:
    """Query-key scores one attention head computes for this forward (the benchmark's FLOP count: 4 d per
    score): what `prefill_by_blocks` covers, or the dense path's padded [B, Cmax] x [buffer ; chunk]."""
    if meta.decode:
        return meta.batch_size * meta.buffer_len
    if not pays(meta, block):
        return meta.batch_size * meta.max_len * (meta.buffer_len + meta.max_len)
    total = 0
    for n, start in zip(meta.seqlens, meta.starts):
        held = min(start, meta.buffer_len) if meta.buffer_len else 0
        total += sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in block_ranges(n, held + n, window, block))
    return total


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per sequence: q `[B, heads, d]` over keys/values `[B, kv_heads, K, d]` under `mask`
    `[B, 1, 1, K]` -> `[B, heads, d]`, as two batched products over each KV head's query group.

    SDPA's CPU kernel tiles one query row at a time against blocks of 512 keys; these two products are 2-3x
    faster for 4k-16k keys (benchmarks/NOTES.md). fp32 only: half-precision scores keep SDPA's fp32 accumulators.
    """
    b, heads, d = q.shape
    groups = q.view(b, keys.shape[1], heads // keys.shape[1], d)  # query heads h*G..h*G+G-1 share KV head h
    scores = torch.matmul(groups, keys.transpose(-1, -2)).mul_(d**-0.5).masked_fill_(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), values).view(b, heads, d)
