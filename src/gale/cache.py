"""Rolling buffer KV cache, and the per-forward plan of who attends to what.

Contract (the worked example uses capacity W=4, window W=4):

* A sequence owns one *slot*: a buffer of `capacity` positions per layer, shaped
  `[n_kv_heads, capacity, head_dim]` (KV heads only: grouped-query heads are never copied).
* The key/value of absolute position p lives at buffer index `p % capacity`; newer positions
  overwrite older ones. After 10 tokens, indices 0..3 hold positions 8, 9, 6, 7.
* Keys are cached after RoPE, so buffer order never matters: each key keeps its own rotation.
* Window: the query at position i sees keys at positions i-W+1 .. i (W keys, itself included).
  With capacity == W, everything a new token may see is either in the buffer or in its own chunk.
* A forward step adds C_b new tokens to each sequence b. Decode steps (every C_b == 1) write
  first and attend over the buffer; prefill chunks attend over [buffer ; own chunk] and write
  afterwards, keeping only the chunk's last `capacity` keys, so chunks longer than W work.
* `capacity` may be set below the window (or the model may have no window) to bound memory;
  then a sequence may not outgrow `capacity` tokens and `prepare` says so instead of forgetting.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import ModelArgs


class CacheFullError(ValueError):
    """A sequence would need positions the cache can no longer hold."""


@dataclass
class BatchMeta:
    """Everything a forward over packed sequences needs besides the tokens.

    Tokens of all sequences are concatenated (`N = sum(seqlens)`, no padding). Attention works
    on a padded `[B, Cmax]` view built with `gather`; `mask` is `[B, 1, Cmax, n_keys]`.
    """

    seqlens: list[int]
    positions: torch.Tensor  # [N] absolute positions, for RoPE
    gather: torch.Tensor | None  # [B * Cmax] packed index of each padded row; None when all C_b are equal
    scatter: torch.Tensor | None  # [N] padded row of each packed token; None when all C_b are equal
    query_pos: torch.Tensor  # [B, 1, Cmax, 1] absolute position of each padded query row
    key_pos: torch.Tensor  # [B, 1, 1, buffer_len (+ Cmax unless decode)] each key's position, -1 = none
    window: int | None
    slots: torch.Tensor | slice | None  # cache slots of the sequences (a slice when contiguous)
    buffer_len: int  # buffer entries each sequence's attention reads (0 without a cache)
    decode: bool  # write-then-attend over the buffer only
    write_src: torch.Tensor | None  # [M] packed indices of the tokens whose K/V are stored
    write_slot: torch.Tensor | None  # [M] their slot
    write_idx: torch.Tensor | None  # [M] their buffer index (position % capacity)
    starts: list[int]  # tokens each sequence held before this step (its first new position)
    slot_ids: list[int] | None  # the slots as a list (None without a cache)
    # gale.attention's band masks (tensors or None) and FlexAttention BlockMasks, keyed by shape: built by the
    # first layer of a forward and reused by the others
    block_masks: dict[tuple, object] = field(default_factory=dict)

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """`[B, 1, Cmax, n_keys]`, True = attend: the query at position p sees the key at k iff p - W < k <= p.
        Built on first use: prefill by query blocks (gale.attention) never reads it, and for a chunk of W
        tokens after W buffered ones it is W x 2W booleans (32 MB at W=4096, 100 MB for a 2W chunk)."""
        qp, kp = self.query_pos, self.key_pos
        mask = (kp >= 0) & (kp <= qp)
        return mask if self.window is None else mask & (kp > qp - self.window)

    @property
    def batch_size(self) -> int:
        return len(self.seqlens)

    @property
    def max_len(self) -> int:
        return max(self.seqlens)

    @property
    def last_index(self) -> torch.Tensor:
        """Packed index of each sequence's last new token (where next-token logits come from)."""
        return torch.tensor(self.seqlens, device=self.positions.device).cumsum(0) - 1


def _buffer_positions(written: torch.Tensor, n_keys: int, capacity: int) -> torch.Tensor:
    """Absolute position held at buffer index s once `written[b]` tokens were written (-1 = empty)."""
    s = torch.arange(n_keys, device=written.device)
    last = written[:, None] - 1
    pos = last - torch.remainder(last - s, capacity)
    return torch.where(pos >= 0, pos, -1)


def plan(
    seqlens: list[int],
    start: list[int],
    window: int | None,
    *,
    capacity: int | None = None,
    slots: list[int] | None = None,
    device: torch.device | str = "cpu",
) -> BatchMeta:
    """Build the attention plan for sequences that already hold `start[b]` cached tokens.

    Without `capacity`/`slots` there is no cache: each sequence attends causally to itself only. When every
    sequence adds one token (and there is a cache) `_decode_plan` builds the same fields the short way.

    Worked example: `seqlens=[3, 2], start=[6, 0], window=4, capacity=4, slots=[0, 1]`
    (sequence 0 holds 6 tokens and adds positions 6..8; sequence 1 is new and adds positions 0..1):

    * positions `[6, 7, 8, 0, 1]` (packed, for RoPE); Cmax = 3, so sequence 1 gets one pad row, which
      mirrors its last real query: `gather = [0, 1, 2, 3, 4, 4]`, `scatter = [0, 1, 2, 3, 4]`.
    * keys: the first `buffer_len = min(capacity, max(start)) = 4` buffer entries, then each own chunk
      (padded to Cmax). Their positions: sequence 0 `[4, 5, 2, 3 | 6, 7, 8]` (6 tokens written: index
      p % 4 holds 4, 5, 2, 3), sequence 1 `[-, -, -, - | 0, 1, -]` (- = nothing there).
    * mask: query q sees key position k iff `q - window < k <= q`. Sequence 0's query 6 sees 3, 4, 5, 6:
      `[1, 1, 0, 1 | 1, 0, 0]`; sequence 1's query 1 sees 0, 1: `[0, 0, 0, 0 | 1, 1, 0]`.
    * writes, after attending: each chunk's last `capacity` tokens go to index position % capacity,
      `write_src = [0, 1, 2, 3, 4]`, `write_slot = [0, 0, 0, 1, 1]`, `write_idx = [2, 3, 0, 0, 1]`.
    """
    if not seqlens or min(seqlens) < 1:
        raise ValueError(f"every sequence needs at least one new token, got seqlens={seqlens}")
    B, cmax = len(seqlens), max(seqlens)
    dev = torch.device(device)
    if capacity is not None and cmax == 1:
        return _decode_plan(start, window, capacity, slots, dev)
    lens = torch.tensor(seqlens, device=dev)
    start_t = torch.tensor(start, device=dev)
    uniform = all(c == cmax for c in seqlens)

    col = torch.arange(cmax, device=dev)
    real = col[None, :] < lens[:, None]  # [B, Cmax]
    q_col = torch.minimum(col[None, :], lens[:, None] - 1)  # pad rows mirror the last real query
    q_pos = start_t[:, None] + q_col  # [B, Cmax]
    positions = q_pos[real]

    offsets = lens.cumsum(0) - lens
    gather = scatter = None
    if not uniform:
        gather = (offsets[:, None] + q_col).reshape(-1)
        scatter = (torch.arange(B, device=dev)[:, None] * cmax + col[None, :])[real]

    buffer_len = min(capacity, max(start)) if capacity is not None else 0
    key_pos = torch.where(real, start_t[:, None] + col[None, :], -1)  # [B, Cmax]: the chunk's own keys
    if buffer_len:  # the buffer's keys come first
        key_pos = torch.cat((_buffer_positions(start_t, buffer_len, capacity), key_pos), dim=1)

    write_src = write_slot = write_idx = None
    slot_ix: torch.Tensor | slice | None = None
    if capacity is not None:
        assert slots is not None
        slot_ix = _slot_index(slots, dev)
        keep = torch.clamp(lens, max=capacity)
        keep_row = col[None, :] >= (lens - keep)[:, None]
        sel = real & keep_row
        write_src = (offsets[:, None] + col[None, :])[sel]
        write_slot = torch.tensor(slots, device=dev)[:, None].expand(B, cmax)[sel]
        write_idx = torch.remainder(start_t[:, None] + col[None, :], capacity)[sel]

    return BatchMeta(
        seqlens=list(seqlens),
        positions=positions,
        gather=gather,
        scatter=scatter,
        query_pos=q_pos[:, None, :, None],
        key_pos=key_pos[:, None, None, :],
        window=window,
        slots=slot_ix,
        buffer_len=buffer_len,
        decode=False,
        write_src=write_src,
        write_slot=write_slot,
        write_idx=write_idx,
        starts=list(start),
        slot_ids=None if slots is None else list(slots),
    )


def _slot_index(slots: list[int], dev: torch.device) -> torch.Tensor | slice:
    """Index of the batch's slots in the cache buffers: a slice (a view, no copy) when they are contiguous."""
    first, B = slots[0], len(slots)
    return slice(first, first + B) if slots == list(range(first, first + B)) else torch.tensor(slots, device=dev)


def _decode_plan(
    start: list[int], window: int | None, capacity: int, slots: list[int] | None, dev: torch.device
) -> BatchMeta:
    """plan() when every sequence adds one token (each step of generation): the same fields in a dozen ops
    instead of ~35, as the per-token Python work counts against a ~20 ms step on a small CPU model."""
    assert slots is not None
    B = len(start)
    positions = torch.tensor(start, device=dev)
    buffer_len = min(capacity, max(start) + 1)
    key_pos = _buffer_positions(positions + 1, buffer_len, capacity)[:, None, None, :]  # never above the query's
    return BatchMeta(
        seqlens=[1] * B,
        positions=positions,
        gather=None,
        scatter=None,
        query_pos=positions[:, None, None, None],
        key_pos=key_pos,
        window=window,
        slots=_slot_index(slots, dev),
        buffer_len=buffer_len,
        decode=True,
        write_src=torch.arange(B, device=dev),
        write_slot=torch.tensor(slots, device=dev),
        write_idx=torch.remainder(positions, capacity),
        starts=list(start),
        slot_ids=list(slots),
    )


def buffer_capacity(args: ModelArgs, capacity: int | None = None) -> int:
    """Positions a sequence's buffer holds: the window (enough to never forget a visible key) or the context,
    or less when the caller bounds memory."""
    limit = min(args.sliding_window, args.max_seq_len) if args.sliding_window else args.max_seq_len
    return min(capacity, limit) if capacity else limit


def lazy_zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Zeros that cost memory only where they are written, on the CPU: calloc'd (numpy's zeros) pages the OS
    maps on first touch, where torch.zeros writes every page up front. A cache sized for 8 slots with one in
    use then holds one slot's pages (SmolLM2's default load: RSS 313 -> 276 MB).
    Zeros, not empty memory: a masked score's zero weight times a NaN left in an unwritten entry is NaN.
    Elsewhere torch.zeros."""
    if device.type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, np.uint8)).view(dtype).view(shape)


class RollingCache:
    """K/V buffers for `max_seqs` sequences, bounded by `capacity` positions each.

    Buffers start short and grow (doubling) as sequences lengthen, up to `capacity`; after that
    they only roll, so memory never grows with sequence length.
    """

    def __init__(
        self,
        args: ModelArgs,
        max_seqs: int,
        capacity: int | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        initial: int = 256,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self.capacity = buffer_capacity(args, capacity)
        self.window = args.sliding_window
        # A buffer at least as long as the window never forgets a key that is still visible.
        self.rolls = self.window is not None and self.capacity >= self.window
        self.n_layers, self.kv_shape = args.n_layers, (args.n_kv_heads, args.head_dim)
        self.device, self.dtype = torch.device(device), dtype
        # Storage may be narrower than the model's arithmetic (fp16 K/V under an fp32 model): reads convert.
        self.compute_dtype = compute_dtype or dtype
        self.lengths = [0] * max_seqs
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._grow(min(initial, self.capacity))

    def _grow(self, size: int) -> None:
        shape = (self.max_seqs, self.kv_shape[0], size, self.kv_shape[1])
        new = [lazy_zeros(shape, self.device, self.dtype) for _ in range(2 * self.n_layers)]
        for old, fresh in zip(self.k + self.v, new):
            fresh[:, :, : old.shape[2]] = old
        self.k, self.v = new[: self.n_layers], new[self.n_layers :]

    def _ensure(self, positions: int) -> None:
        """Allocate room for `positions` per sequence (at most `capacity`), doubling to grow rarely."""
        needed = min(self.capacity, positions)
        if needed > self.allocated:
            self._grow(min(self.capacity, max(needed, 2 * self.allocated)))

    @property
    def allocated(self) -> int:
        """Positions per sequence currently allocated (<= capacity)."""
        return self.k[0].shape[2]

    @property
    def max_nbytes(self) -> int:
        """Bytes once fully grown: the bound that holds however long the sequences get."""
        per_position = 2 * self.n_layers * self.kv_shape[0] * self.kv_shape[1] * self.k[0].element_size()
        return per_position * self.capacity * self.max_seqs

    @property
    def max_seqs(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self, slot: int) -> None:
        """Forget a sequence. Old entries need no zeroing: the mask never shows unwritten positions."""
        self.lengths[slot] = 0

    def prepare(self, slots: list[int], seqlens: list[int]) -> BatchMeta:
        """Plan a forward that appends `seqlens[b]` tokens to slot `slots[b]`, and book them."""
        start = [self.lengths[s] for s in slots]
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one step: {slots}")
        if not self.rolls:
            for s, n, c in zip(slots, start, seqlens):
                if n + c > self.capacity:
                    raise CacheFullError(
                        f"sequence in slot {s} would reach {n + c} tokens; this cache holds {self.capacity}"
                    )
        self._ensure(max(n + c for n, c in zip(start, seqlens)))
        meta = plan(seqlens, start, self.window, capacity=self.capacity, slots=slots, device=self.device)
        for s, c in zip(slots, seqlens):
            self.lengths[s] += c
        return meta

    def load(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Start slot's sequence with the keys/values `[layers, n_kv_heads, n, head_dim]` of positions 0..n-1
        (a stored prefix; n <= capacity, so position p is buffer index p)."""
        n = k.shape[2]
        if n > self.capacity:
            raise ValueError(f"a prefix of {n} positions does not fit a cache of {self.capacity}")
        self._ensure(n)
        for layer in range(self.n_layers):
            self.k[layer][slot, :, :n] = k[layer]
            self.v[layer][slot, :, :n] = v[layer]
        self.lengths[slot] = n

    def read(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values `[layers, n_kv_heads, end - start, head_dim]` of positions start..end-1, which must not
        have rolled (end <= capacity) nor been overwritten (the sequence holds fewer than start + capacity)."""
        if end > min(self.capacity, self.lengths[slot]) or self.lengths[slot] > start + self.capacity:
            raise ValueError(f"positions {start}..{end - 1} are not in slot {slot}'s buffer")
        return (torch.stack([t[slot, :, start:end] for t in self.k]),
                torch.stack([t[slot, :, start:end] for t in self.v]))

    def keys_values(self, layer: int, meta: BatchMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `buffer_len` buffer entries of the batch's slots: `[B, n_kv_heads, buffer_len, head_dim]`."""
        n, dt = meta.buffer_len, self.compute_dtype
        return self.k[layer][meta.slots, :, :n].to(dt), self.v[layer][meta.slots, :, :n].to(dt)

    def history(self, layer: int, slot: int, start: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values of the last min(start, capacity) positions before `start` in position order, as at
        most two views of the ring `[n_kv_heads, n, head_dim]` (storage dtype), oldest first.

        Example: capacity 4 after 10 tokens (indices 0..3 hold positions 8, 9, 6, 7): indices 2..3 then 0..1,
        i.e. positions 6, 7 | 8, 9. After 3 tokens: indices 0..2 (positions 0..2), one piece.
        """
        n = min(start, self.capacity)
        first = (start - n) % self.capacity
        spans = [(first, min(first + n, self.capacity))]
        if first + n > self.capacity:
            spans.append((0, first + n - self.capacity))
        k, v = self.k[layer][slot], self.v[layer][slot]
        return [k[:, a:b] for a, b in spans], [v[:, a:b] for a, b in spans]

    def store(self, layer: int, meta: BatchMeta, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write packed new keys/values `[N, n_kv_heads, head_dim]` to their buffer indices."""
        src = meta.write_src
        self.k[layer][meta.write_slot, :, meta.write_idx] = k[src].to(self.k[layer].dtype)
        self.v[layer][meta.write_slot, :, meta.write_idx] = v[src].to(self.v[layer].dtype)
