"""Prefill attention that computes only the scores a sliding window lets each query see.

The dense path attends a chunk of C queries over `[buffer ; chunk]` under a mask: with C = W that is W x 2W
scores, about half of them masked, the same work as full attention at 16k. Here each sequence's keys are laid
out in position order (the rolling buffer unrolled, `RollingCache.history`: at most two ring segments, then the
chunk's own keys) and its queries are cut into blocks of `QUERY_BLOCK`; a block reads only the one contiguous
key range its queries' windows reach (at most W + block - 1 keys): keys no query of the block sees are never
read. Two ways to run a block:

* tiles (CPU, fp32 inference): the range split into an unmasked middle every query sees, the causal diagonal
  and the window's edge (causal once reversed), each by torch's CPU flash kernel, merged by their log-sum-exps:
  exactly W scores per query (C x W in all), no mask at all.
* band mask (any device, training, blocks near a sequence's start): one public SDPA call over the range under a
  float band mask, which hides block - 1 keys per query: C x (W + block - 1).

Same arithmetic as the dense path (fp32 softmax over the keys a query sees; hidden keys add nothing), so the
numbers agree to rounding. The band path is PyTorch's SDPA over contiguous slices, the same code on any device,
no compilation. On a GPU SDPA dispatches each block to its flash or memory-efficient kernel (they take a float
mask).
* flex (`flex_window_attention`, opt-in: `Attention.flex`): one FlexAttention call per sequence over all its keys
  under a sliding-window BlockMask, which skips the key tiles no query of a tile row sees and runs the fully
  visible ones without evaluating the mask. Fast only compiled (`torch.compile`, Triton on a GPU), so the CPU
  path never takes it by default; benchmarks/attention.py measures it against the band path on a GPU
  (benchmarks/NOTES.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .cache import BatchMeta, RollingCache

# Queries per block, measured on the 2-core CPU (benchmarks/NOTES.md), one W=4096 chunk after 2W tokens vs the
# dense path: tiles (CPU inference) 768: 1.85x, 1024: 1.99x, 2048: 2.03x (bigger blocks, bigger kernel tiles);
# band masks alone (which compute block - 1 hidden scores per query) 768: 1.56-1.73x, 192-512: 1.33-1.89x.
# 1024 keeps chunks of W/2 on the block path (only chunks longer than a block take it).
QUERY_BLOCK = 1024


def pays(meta: BatchMeta, block: int | None) -> bool:
    """Whether this forward takes the block path: a step with a chunk longer than one block. A chunk of at most
    one block reads at most W + block keys per query on either path (the buffer holds no more than the window),
    so such steps and decode steps keep the dense path: one batched call."""
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


_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")  # private: may move


def _flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU flash kernel: output `[1, heads, L, d]` and the log-sum-exp of each row's scores `[1, heads, L]`
    (what merging attention over separate key ranges needs; public SDPA does not return it). GQA heads as SDPA's."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)


def _tiled_block(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, own: int, window: int | None
) -> torch.Tensor:
    """One block of b queries `[1, heads, b, d]` whose own keys start at index `own`, as key tiles without masks,
    merged by their log-sum-exps: exactly the scores the window allows (up to the kernel's causal tiling).

    Worked example, window 4, b = 3, own = 4 (queries see keys 1..4, 2..5, 3..6): the edge keys 1..2 (query 0
    sees both, query 1 key 2: causal once both are reversed), the middle key 3 (all three, no mask) and the
    diagonal 4..6 (causal). Without a window the middle is every key before `own` and there is no edge.
    """
    b = q.shape[2]
    mid = 0 if window is None else own + b - window  # first key every query of the block sees
    parts = [_flash_lse(q, keys[:, :, own : own + b], values[:, :, own : own + b], True)]
    if mid < own:
        parts.append(_flash_lse(q, keys[:, :, mid:own], values[:, :, mid:own], False))
    if window is not None and b > 1:  # queries 0..b-2 see keys own-W+1+j for j >= their row: causal reversed
        lo = own - window + 1
        out, lse = _flash_lse(q[:, :, : b - 1].flip(2), keys[:, :, lo:mid].flip(2), values[:, :, lo:mid].flip(2), True)
        parts.append((F.pad(out.flip(2), (0, 0, 0, 1)), F.pad(lse.flip(2), (0, 1), value=float("-inf"))))
    lse = torch.stack([lse for _, lse in parts]).logsumexp(0)
    return sum(out * (part_lse - lse).exp()[..., None] for out, part_lse in parts)


def tile_window(own: int, n_queries: int, window: int | None) -> int | None | bool:
    """The window `_tiled_block` can run a block with: `window` when every query's window lies inside the keys
    (and the block is no longer than it), None when no query's window reaches before key 0 (causal alone), False
    when neither (a block straddling key 0 keeps its band mask). E.g. window 4: own 4, 3 queries -> 4; own 0,
    3 queries (windows from keys -3, -2, -1: all keys up to themselves) -> None; own 2, 3 queries (query 0's
    window starts before key 0, query 2's at key 1) -> False."""
    if window is None or own + n_queries - window <= 0:
        return None
    return window if own - window + 1 >= 0 and n_queries <= window else False


def window_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    window: int | None,
    block: int,
    masks: dict[tuple, object],
    tiled: bool = False,
) -> torch.Tensor:
    """One sequence's attention by query blocks: q `[C, heads, d]`, keys/values `[kv_heads, K, d]` in position
    order ending with the C queries' own. Returns `[C, heads, d]`. `masks` memoizes `band_mask` by shape.

    `tiled` (CPU inference): a block whose window lies wholly inside the keys runs as unmasked tiles merged by
    log-sum-exp (`_tiled_block`) instead of one SDPA call under a band mask (~15% faster at W=4096: no masked
    scores); the others, near the start of a sequence, keep the band mask.
    """
    n_q, n_k = q.shape[0], keys.shape[1]
    qt, kt, vt = q.transpose(0, 1)[None], keys[None], values[None]  # [1, heads, C, d], [1, kv_heads, K, d]
    outs = []
    for q0, q1, k0, k1 in block_ranges(n_q, n_k, window, block):
        own = n_k - n_q + q0
        if tiled and (reach := tile_window(own, q1 - q0, window)) is not False:
            outs.append(_tiled_block(qt[:, :, q0:q1], kt, vt, own, reach))
            continue
        shape = (own - k0, q1 - q0, k1 - k0)
        if shape not in masks:
            masks[shape] = band_mask(*shape, window, q.dtype, q.device)
        outs.append(F.scaled_dot_product_attention(
            qt[:, :, q0:q1], kt[:, :, k0:k1], vt[:, :, k0:k1], masks[shape], enable_gqa=True))
    return torch.cat(outs, dim=2)[0].transpose(0, 1)


FLEX_TILE = 128  # FlexAttention's default tile: BlockMask blocks are FLEX_TILE queries x FLEX_TILE keys


def window_block_mask(n_queries: int, n_keys: int, window: int | None, device: torch.device) -> object:
    """FlexAttention BlockMask for C queries over keys in position order that end with the queries' own (query
    r is key `n_keys - n_queries + r`): each sees itself and the `window - 1` keys before it (all before it
    without a window). Tiles wholly outside every query's window are skipped; wholly inside, run unmasked.

    Example: window 4, 2 buffered keys then 3 queries (n_keys 5): query 0 (key 2) sees keys 0..2, query 2
    (key 4) keys 1..4.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    own = torch.tensor(n_keys - n_queries, device=device)  # a tensor: a compiled call does not recompile per value

    def visible(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        seen = k <= q + own
        return seen if window is None else seen & (k > q + own - window)

    return create_block_mask(visible, None, None, n_queries, n_keys, device=device, BLOCK_SIZE=FLEX_TILE)


@functools.cache
def _flex(device_type: str) -> Callable[..., torch.Tensor]:
    """flex_attention, compiled where it has a fused kernel (CUDA, via Triton); elsewhere PyTorch's unfused
    reference (the same numbers, slow: the CPU tests' path)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


def flex_window_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int | None, masks: dict[tuple, object]
) -> torch.Tensor:
    """One sequence's attention as one FlexAttention call: q `[C, heads, d]`, keys/values `[kv_heads, K, d]` in
    position order ending with the C queries' own -> `[C, heads, d]`. `masks` memoizes the BlockMask by shape,
    so the layers of one forward build it once."""
    shape = ("flex", q.shape[0], keys.shape[1], window)
    if shape not in masks:
        masks[shape] = window_block_mask(q.shape[0], keys.shape[1], window, q.device)
    out = _flex(q.device.type)(q.transpose(0, 1)[None], keys[None], values[None], block_mask=masks[shape],
                               enable_gqa=True)
    return out[0].transpose(0, 1)


def flex_scores(n_queries: int, n_keys: int, window: int | None) -> int:
    """Query-key scores FlexAttention computes for one head: every tile (FLEX_TILE x FLEX_TILE, clipped to the
    sizes) that some query of its row sees, in full."""
    total = 0
    for q0, q1, k0, k1 in block_ranges(n_queries, n_keys, window, FLEX_TILE):  # the keys each tile row reaches
        total += (q1 - q0) * (min(n_keys, -(-k1 // FLEX_TILE) * FLEX_TILE) - k0 // FLEX_TILE * FLEX_TILE)
    return total


def prefill_by_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: BatchMeta,
    cache: RollingCache | None,
    layer: int,
    window: int | None,
    block: int,
    flex: bool = False,
) -> torch.Tensor:
    """Packed q `[N, heads, d]`, k/v `[N, kv_heads, d]` -> packed attention output `[N, heads, d]`, one
    sequence at a time (no padding: each keeps its own length), each over its buffer then its own chunk:
    by query blocks, or (`flex`) as one FlexAttention call."""
    # The tiles call torch's CPU flash kernel directly (inference: its backward is not needed, nor promised)
    tiled = q.device.type == "cpu" and q.dtype == torch.float32 and not torch.is_grad_enabled() and _CPU_FLASH
    outs, offset = [], 0
    for b, n in enumerate(meta.seqlens):
        rows = slice(offset, offset + n)
        offset += n
        keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        if meta.buffer_len and meta.starts[b]:
            old_k, old_v = cache.history(layer, meta.slot_ids[b], meta.starts[b])
            keys = torch.cat((*old_k, keys), dim=1).to(q.dtype)
            values = torch.cat((*old_v, values), dim=1).to(q.dtype)
        if flex:
            outs.append(flex_window_attention(q[rows], keys, values, window, meta.block_masks))
        else:
            outs.append(window_attention(q[rows], keys, values, window, block, meta.block_masks, tiled))
    return torch.cat(outs)


def scores_computed(
    meta: BatchMeta, window: int | None, block: int | None, tiled: bool = True, flex: bool = False
) -> int:
    """Query-key scores one attention head computes for this forward (the benchmark's FLOP count: 4 d per
    score): what `prefill_by_blocks` covers (`tiled`: as on the CPU in inference; the kernel's causal tiles
    add a little; `flex`: FlexAttention's whole tiles), or the dense path's padded [B, Cmax] x [buffer ; chunk]."""
    if meta.decode:
        return meta.batch_size * meta.buffer_len
    if not pays(meta, block):
        return meta.batch_size * meta.max_len * (meta.buffer_len + meta.max_len)
    total = 0
    for n, start in zip(meta.seqlens, meta.starts):
        held = min(start, meta.buffer_len) if meta.buffer_len else 0
        if flex:
            total += flex_scores(n, held + n, window)
            continue
        for q0, q1, k0, k1 in block_ranges(n, held + n, window, block):
            reach = tile_window(held + q0, q1 - q0, window) if tiled else False
            if reach is False:
                total += (q1 - q0) * (k1 - k0)  # the band mask's whole range
            else:  # each query its own window (reach) or every key up to itself
                total += (q1 - q0) * reach if reach else (q1 - q0) * (held + q0) + (q1 - q0) * (q1 - q0 + 1) // 2
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
