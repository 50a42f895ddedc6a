"""Slot arithmetic, masks at the window edge, growth, and the memory bound of the rolling cache."""

import pytest
import torch

from gale.cache import CacheFullError, RollingCache, _buffer_positions, lazy_zeros, plan
from gale.config import ModelArgs

TINY = ModelArgs(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=50,
                 sliding_window=4, max_seq_len=1 << 20)


def test_position_p_lives_at_index_p_mod_w():
    # After 10 tokens in a 4-slot buffer, indices 0..3 hold positions 8, 9, 6, 7.
    assert _buffer_positions(torch.tensor([10]), 4, 4).tolist() == [[8, 9, 6, 7]]
    assert _buffer_positions(torch.tensor([2]), 4, 4).tolist() == [[0, 1, -1, -1]]
    assert _buffer_positions(torch.tensor([0]), 4, 4).tolist() == [[-1, -1, -1, -1]]


def test_one_shot_mask_is_causal_with_w_keys_including_self():
    W = 3
    mask = plan([7], [0], W).mask[0, 0]
    for i in range(7):
        for j in range(7):
            assert mask[i, j].item() == (i - W < j <= i), (i, j)


def test_chunk_attends_buffer_window_then_itself_causally():
    # 6 tokens cached in a 4-slot buffer (positions 4, 5, 2, 3 at indices 0..3), then a chunk of 3 at 6, 7, 8.
    meta = plan([3], [6], 4, capacity=4, slots=[0])
    assert meta.buffer_len == 4 and not meta.decode
    mask = meta.mask[0, 0].int().tolist()
    # keys: buffer indices 0..3 (positions 4, 5, 2, 3), then the chunk (positions 6, 7, 8)
    assert mask == [
        [1, 1, 0, 1, 1, 0, 0],  # query 6 sees 3, 4, 5, 6
        [1, 1, 0, 0, 1, 1, 0],  # query 7 sees 4, 5, 6, 7
        [0, 1, 0, 0, 1, 1, 1],  # query 8 sees 5, 6, 7, 8
    ]
    assert meta.write_idx.tolist() == [2, 3, 0]  # 6 % 4, 7 % 4, 8 % 4


def test_chunk_longer_than_buffer_writes_only_its_last_w_keys():
    meta = plan([10], [3], 4, capacity=4, slots=[2])
    assert meta.write_src.tolist() == [6, 7, 8, 9]  # positions 9..12
    assert meta.write_idx.tolist() == [1, 2, 3, 0]
    assert meta.write_slot.tolist() == [2, 2, 2, 2]


def test_decode_writes_first_and_masks_by_slot_position():
    meta = plan([1, 1], [9, 2], 4, capacity=4, slots=[0, 1])
    assert meta.decode and meta.buffer_len == 4
    # seq 0: query 9, buffer after writing holds 8, 9, 6, 7 -> sees 6..9; seq 1: query 2, holds 0, 1, 2
    assert meta.mask[:, 0, 0].int().tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


@pytest.mark.parametrize(("window", "capacity"), [(3, 3), (5, 5), (None, 16), (None, 40)])
def test_decode_plans_against_brute_force(window, capacity):
    """The decode fast path of plan(): every key is visible iff it is written and inside the window."""
    g = torch.Generator().manual_seed(capacity)
    for slots in ([0, 1, 2], [4, 0, 2], [3]):
        start = torch.randint(0, 30 if window else capacity - 1, (len(slots),), generator=g).tolist()
        meta = plan([1] * len(slots), start, window, capacity=capacity, slots=slots)
        assert meta.decode and meta.seqlens == [1] * len(slots) and meta.positions.tolist() == start
        assert meta.buffer_len == min(capacity, max(start) + 1)
        for b, q in enumerate(start):
            held = {p % capacity: p for p in range(max(0, q + 1 - capacity), q + 1)}  # after writing q
            for j in range(meta.buffer_len):
                seen = j in held and (window is None or held[j] > q - window)
                assert meta.mask[b, 0, 0, j].item() == seen, (slots, start, b, j)
        assert meta.write_src.tolist() == list(range(len(slots))) and meta.write_slot.tolist() == slots
        assert meta.write_idx.tolist() == [p % capacity for p in start]
        rows = torch.arange(8)[meta.slots].tolist()
        assert rows == slots


def test_padding_rows_never_fully_masked():
    meta = plan([1, 9], [0, 0], 2)
    assert meta.mask.any(-1).all()


def test_memory_is_flat_however_long_the_sequence():
    cache = RollingCache(TINY, 2, dtype=torch.float32)
    sizes = set()
    for _ in range(300):
        cache.prepare([0, 1], [1, 1])
        sizes.add(cache.nbytes)
    assert len(sizes) == 1 and cache.lengths == [300, 300]
    assert cache.nbytes == cache.max_nbytes == 2 * 2 * 2 * 2 * 4 * 8 * 4


def test_buffers_grow_on_demand_up_to_capacity():
    args = ModelArgs(**{**TINY.to_dict(), "sliding_window": None, "max_seq_len": 100})
    cache = RollingCache(args, 1, initial=4)
    cache.prepare([0], [3])
    assert cache.allocated == 4
    cache.prepare([0], [3])
    assert cache.allocated == 8
    cache.prepare([0], [50])
    assert cache.allocated == 56
    with pytest.raises(CacheFullError, match="slot 0"):
        cache.prepare([0], [50])  # no window: the cache cannot forget, so it refuses


def test_rolling_cache_is_eight_times_smaller_at_32k():
    """The seed's figure: W=4096 slots vs a full cache of 32k positions, Mistral 7B shapes."""
    mistral = ModelArgs()
    rolling = RollingCache(mistral, 1, device="meta", dtype=torch.float16, initial=1)
    full_args = ModelArgs(sliding_window=None, max_seq_len=32768)
    full = RollingCache(full_args, 1, device="meta", dtype=torch.float16, initial=1)
    assert rolling.capacity == 4096 and full.capacity == 32768
    assert full.max_nbytes / rolling.max_nbytes == 8
    # the KV heads only: 8 heads of 128, not 32 query heads
    assert rolling.max_nbytes == 2 * 32 * 8 * 128 * 4096 * 2


def test_grouped_query_cache_stores_kv_heads_only():
    cache = RollingCache(TINY, 3)
    assert cache.k[0].shape == (3, TINY.n_kv_heads, TINY.sliding_window, TINY.head_dim)


def test_bad_plans_are_rejected():
    cache = RollingCache(TINY, 2)
    with pytest.raises(ValueError, match="twice"):
        cache.prepare([0, 0], [1, 1])
    with pytest.raises(ValueError, match="at least one"):
        plan([0], [0], 4)


def test_plan_docstring_example():
    """The worked example in plan()'s docstring, so that it stays true."""
    meta = plan([3, 2], [6, 0], 4, capacity=4, slots=[0, 1])
    assert meta.positions.tolist() == [6, 7, 8, 0, 1] and meta.buffer_len == 4 and not meta.decode
    assert meta.gather.tolist() == [0, 1, 2, 3, 4, 4] and meta.scatter.tolist() == [0, 1, 2, 3, 4]
    assert meta.mask[0, 0, 0].int().tolist() == [1, 1, 0, 1, 1, 0, 0]
    assert meta.mask[1, 0, 1].int().tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert meta.write_src.tolist() == [0, 1, 2, 3, 4] and meta.write_slot.tolist() == [0, 0, 0, 1, 1]
    assert meta.write_idx.tolist() == [2, 3, 0, 0, 1]


def _rss_mb() -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lazy_zeros_are_zeros_whose_pages_cost_nothing_until_written(dtype):
    shape = (4, 2, 1 << 20, 4)  # 32M entries: 64-128 MB
    before = _rss_mb()
    t = lazy_zeros(shape, torch.device("cpu"), dtype)
    assert t.shape == shape and t.dtype == dtype
    assert _rss_mb() - before < 16  # torch.zeros would add the whole tensor
    t[0, 0, :1000] = 1.5
    assert t[0, 0, :1000].eq(1.5).all() and t.count_nonzero().item() == 4000
    assert t[1:].count_nonzero().item() == 0
