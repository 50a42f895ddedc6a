"""Prefill by query blocks (gale.attention) against a naive softmax and against the dense masked path.

Tiny windows (1..16) over sequences several times longer make the rolling buffer wrap many times; query blocks
of 1..9 make chunks span many blocks, longer and shorter than the window.
"""

import pytest
import torch
from test_engine import CharTokenizer, reference_greedy
from test_model import assert_close, assert_sees_exactly_w_keys, chunked, hf_logits, reference_pair, tiny_args

from gale.attention import (
    FLEX_TILE,
    _tiled_block,
    band_mask,
    block_ranges,
    flex_scores,
    flex_window_attention,
    scores_computed,
    tile_window,
    window_attention,
    window_block_mask,
)
from gale.cache import RollingCache, plan
from gale.config import ModelArgs
from gale.engine import Engine
from gale.model import Transformer
from gale.prefix import PrefixCache
from gale.sampling import SamplingParams

pytestmark = [pytest.mark.usefixtures("one_thread"),  # FlexAttention on the CPU: unfused on purpose here
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]


def set_block(model: Transformer, block: int | None, flex: bool = False) -> Transformer:
    for layer in model.layers:
        layer.attention.query_block = block
        layer.attention.flex = flex
    return model


def naive(q, keys, values, window):
    """softmax over each query's visible keys, written out: q [C, H, d], keys [KVH, K, d], last C keys own."""
    n_q, n_k = q.shape[0], keys.shape[1]
    group = q.shape[1] // keys.shape[0]
    k, v = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    scores = torch.einsum("chd,hkd->hck", q, k) / q.shape[-1] ** 0.5
    qi = torch.arange(n_k - n_q, n_k)[:, None]
    kj = torch.arange(n_k)[None, :]
    seen = (kj <= qi) & ((kj > qi - window) if window else True)
    weights = scores.masked_fill(~seen, float("-inf")).softmax(-1)
    return torch.einsum("hck,hkd->chd", weights, v)


def test_block_ranges_docstring_example():
    assert block_ranges(6, 10, 4, 3) == [(0, 3, 1, 7), (3, 6, 4, 10)]
    assert block_ranges(5, 5, None, 2) == [(0, 2, 0, 2), (2, 4, 0, 4), (4, 5, 0, 5)]


def test_band_mask_docstring_example_and_unmasked_blocks():
    rows = (band_mask(3, 3, 6, 4, torch.float32, torch.device("cpu")) == 0).int().tolist()
    assert rows == [[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert band_mask(3, 1, 4, 4, torch.float32, torch.device("cpu")) is None  # one query, its whole window
    assert band_mask(5, 1, 6, 4, torch.float32, torch.device("cpu")) is not None  # key 0 is out of its window
    assert band_mask(0, 1, 1, None, torch.float32, torch.device("cpu")) is None


def test_tiled_block_docstring_example():
    """Window 4, 3 queries whose own keys are 4..6: edge, middle and diagonal tiles equal the naive softmax."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 2, 8, generator=g)
    keys, values = torch.randn(1, 7, 8, generator=g), torch.randn(1, 7, 8, generator=g)
    got = _tiled_block(q.transpose(0, 1)[None], keys[None], values[None], 4, 4)[0].transpose(0, 1)
    assert (got - naive(q, keys, values, 4)).abs().max() < 1e-5


def test_history_unrolls_the_ring_in_position_order():
    args = ModelArgs(dim=8, n_layers=1, head_dim=2, hidden_dim=8, n_heads=1, n_kv_heads=1, vocab_size=4,
                     sliding_window=4, max_seq_len=64)
    cache = RollingCache(args, 1, initial=4)
    cache.k[0][0, 0, :, 0] = torch.tensor([8.0, 9, 6, 7])  # after 10 tokens: index p % 4 holds position p
    keys, _ = cache.history(0, 0, 10)
    assert [k.shape[1] for k in keys] == [2, 2]
    assert torch.cat(keys, dim=1)[0, :, 0].tolist() == [6, 7, 8, 9]
    keys, _ = cache.history(0, 0, 3)
    assert len(keys) == 1 and keys[0][0, :, 0].tolist() == [8, 9, 6]
    assert cache.history(0, 0, 8)[0][0][0, :, 0].tolist() == [8, 9, 6, 7]  # a full turn: one piece


@pytest.mark.parametrize("window", [1, 2, 3, 5, 16, None])
def test_window_attention_equals_the_naive_softmax(window):
    g = torch.Generator().manual_seed(window or 0)
    for n_q, held in [(1, 0), (1, 16), (7, 0), (20, 16), (33, 5), (40, 40)]:
        if window and held > window:
            continue  # the buffer never holds more than the window
        q = torch.randn(n_q, 4, 8, generator=g)
        keys, values = torch.randn(2, held + n_q, 8, generator=g), torch.randn(2, held + n_q, 8, generator=g)
        ref = naive(q, keys, values, window)
        for block in (1, 2, 3, 7, 64):
            for tiled in (False, True):  # band masks; unmasked tiles merged by log-sum-exp
                got = window_attention(q, keys, values, window, block, {}, tiled)
                assert (got - ref).abs().max() < 1e-5, (n_q, held, block, tiled)


@pytest.mark.parametrize("window", [1, 2, 3, 4, 7, 16])
def test_blocks_equal_the_dense_path_for_every_chunk_size(window):
    """Chunks 1..window+5 (below, at and above the window), blocks 1..4: the buffer wraps many times."""
    model = reference_pair(tiny_args(sliding_window=window, n_layers=1), seed=window)[1]
    tokens = torch.randint(0, 101, (3 * window + 13,), generator=torch.Generator().manual_seed(window))
    dense = chunked(set_block(model, None), tokens, 1)
    for chunk in range(2, window + 6):
        for block in (1, 2, 3, 4):
            assert_close(chunked(set_block(model, block), tokens, chunk), dense)


@pytest.mark.parametrize("chunk", [3, 8, 11, 70])
@pytest.mark.parametrize("block", [1, 3, 8])
def test_blocks_equal_the_reference_model(chunk, block):
    hf, ours = reference_pair(tiny_args())
    tokens = torch.randint(0, 101, (70,), generator=torch.Generator().manual_seed(1))
    assert_close(chunked(set_block(ours, block), tokens, chunk), hf_logits(hf, tokens))
    with torch.no_grad():
        assert_close(ours(tokens), hf_logits(hf, tokens))  # one shot, no cache


def test_full_attention_by_blocks_equals_the_reference():
    hf, ours = reference_pair(tiny_args(sliding_window=None), seed=7)
    tokens = torch.randint(0, 101, (50,), generator=torch.Generator().manual_seed(8))
    for chunk in (7, 50):
        assert_close(chunked(set_block(ours, 4), tokens, chunk), hf_logits(hf, tokens))


@pytest.mark.parametrize("window", [3, 5])
def test_window_edge_by_blocks(window):
    """Through the block path, position i depends on token i-W+1 and not on i-W."""
    model = set_block(reference_pair(tiny_args(n_layers=1, sliding_window=window), seed=3)[1], 2)
    assert_sees_exactly_w_keys(model, window)


def test_ragged_batches_on_scattered_slots_equal_the_dense_path():
    model = reference_pair(tiny_args(sliding_window=5), seed=2)[1]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 101, (n,), generator=g) for n in (61, 23, 40, 9)]
    slots = [5, 0, 3, 1]
    steps = [[13, 23, 7, 9], [11, 0, 33, 0], [1, 0, 0, 0], [36, 0, 0, 0]]

    def run(block):
        set_block(model, block)
        cache, done, out = RollingCache(model.args, 6), [0] * 4, []
        with torch.no_grad():
            for sizes in steps:
                active = [i for i, n in enumerate(sizes) if n]
                toks = torch.cat([seqs[i][done[i] : done[i] + sizes[i]] for i in active])
                out.append(model(toks, cache.prepare([slots[i] for i in active], [sizes[i] for i in active]), cache))
                for i in active:
                    done[i] += sizes[i]
        return torch.cat(out)

    dense = run(None)
    for block in (1, 4, 6):
        assert_close(run(block), dense)


def test_prefix_hit_then_blocks_equal_the_dense_path():
    """A slot loaded from stored K/V (RollingCache.load), then chunks by blocks that roll the buffer."""
    model = reference_pair(tiny_args(sliding_window=6), seed=4)[1]
    tokens = torch.randint(0, 101, (40,), generator=torch.Generator().manual_seed(5))
    source = RollingCache(model.args, 1)
    with torch.no_grad():
        model(tokens[:5], source.prepare([0], [5]), source)
    k, v = source.read(0, 0, 4)

    def run(block):
        cache = RollingCache(model.args, 3)
        cache.load(2, k, v)
        return chunked(set_block(model, block), tokens[4:], 9, slot=2, cache=cache)

    assert_close(run(2), run(None))


def test_engine_with_prefix_cache_by_blocks_equals_the_uncached_reference():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                                  vocab_size=40, sliding_window=5, max_seq_len=96)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    greedy = SamplingParams(max_tokens=10, ignore_eos=True)
    shared = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    prompts = [shared + [7, 8], shared + [20] * 17, shared]
    refs = [reference_greedy(set_block(model, None), p, greedy.max_tokens) for p in prompts]
    e = Engine(set_block(model, 2), CharTokenizer(), max_seqs=2, step_tokens=16)
    e.prefixes = PrefixCache(256, block=2)
    for p, ref in zip(prompts, refs):
        assert e.generate([p], [greedy])[0].token_ids == ref
    assert [o.token_ids for o in e.generate(prompts, [greedy] * 3)] == refs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_caches_by_blocks_equal_the_dense_path(dtype):
    model = reference_pair(tiny_args(sliding_window=4), seed=6)[1]
    tokens = torch.randint(0, 101, (30,), generator=torch.Generator().manual_seed(6))

    def run(block):
        cache = RollingCache(model.args, 1, dtype=dtype, compute_dtype=torch.float32)
        return chunked(set_block(model, block), tokens, 7, cache=cache)

    # Stored keys round to 16 bits: a 1e-7 difference between the paths can flip one rounding (an ulp of
    # bf16 is 0.4%), which moves later logits by ~1e-4 of their 5.6 magnitude; no more.
    assert (run(3) - run(None)).abs().max() < 2e-3


def test_gradients_by_blocks_equal_the_dense_path():
    model = reference_pair(tiny_args(sliding_window=5), seed=8)[1]
    tokens = torch.randint(0, 101, (30,), generator=torch.Generator().manual_seed(8))

    def grads(block):
        set_block(model, block)
        model.zero_grad()
        model(tokens).logsumexp(-1).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(4), grads(None)):
        assert torch.allclose(a, b, atol=1e-5)


def test_scores_computed_counts_what_each_path_covers():
    # one chunk of 8 queries after 4 held keys, window 4, blocks of 2: band ranges of 2 + 3 keys, or tiles of W
    meta = plan([8], [4], 4, capacity=4, slots=[0])
    assert scores_computed(meta, 4, 2, tiled=False) == 4 * 2 * 5
    assert scores_computed(meta, 4, 2) == 8 * 4
    assert scores_computed(meta, 4, None) == 8 * 12  # dense: every query over [buffer ; chunk]
    assert scores_computed(meta, 4, 8) == 8 * 12  # one block: the dense path is kept
    ragged = plan([8, 1], [4, 2], 4, capacity=4, slots=[0, 1])
    assert scores_computed(ragged, 4, 2) == 8 * 4 + 3
    full = plan([5], [0], None)
    assert scores_computed(full, None, 2, tiled=False) == 2 * 2 + 2 * 4 + 1 * 5
    assert scores_computed(full, None, 2) == 15  # causal: 1 + 2 + 3 + 4 + 5


def test_tile_window_docstring_example():
    assert tile_window(4, 3, 4) == 4 and tile_window(0, 3, 4) is None and tile_window(2, 3, 4) is False
    assert tile_window(9, 5, 4) is False  # a block longer than the window keeps its band mask
    assert tile_window(9, 5, None) is None


def test_block_path_never_builds_the_dense_mask():
    """The dense [B, 1, Cmax, buffer + Cmax] mask is built on first use: a step by query blocks does without it
    (a W chunk after W keys: W x 2W booleans), a dense step builds it, and it is the mask plan() describes."""
    args = tiny_args(sliding_window=4, n_layers=1)
    model = set_block(reference_pair(args, seed=0)[1], 2)
    cache = RollingCache(args, 1)
    x = torch.randint(0, 101, (7,))
    with torch.inference_mode():
        for n, blocks in ((3, True), (2, False), (1, False)):  # then a 2-token chunk (one block: dense), decode
            meta = cache.prepare([0], [n])
            model(x[:n], meta, cache)
            assert ("mask" not in meta.__dict__) == blocks, n
    meta = plan([2], [5], 4, capacity=4, slots=[0])  # positions 5, 6; buffer indices 0..3 hold 4, 1, 2, 3
    assert meta.mask.int().tolist() == [[[[1, 0, 1, 1, 1, 0], [1, 0, 0, 1, 1, 1]]]]


@pytest.mark.parametrize("window", [1, 2, 3, 5, 16, None])
def test_flex_equals_the_naive_softmax(window):
    """FlexAttention's unfused reference on the CPU (the GPU compiles the same call) under the window's BlockMask,
    with lengths across its 128-wide tiles."""
    g = torch.Generator().manual_seed(window or 0)
    for n_q, held in [(1, 0), (1, 16), (7, 0), (20, 16), (130, 5), (200, 16)]:
        if window and held > window:
            continue
        q = torch.randn(n_q, 4, 8, generator=g)
        keys, values = torch.randn(2, held + n_q, 8, generator=g), torch.randn(2, held + n_q, 8, generator=g)
        got = flex_window_attention(q, keys, values, window, {})
        assert (got - naive(q, keys, values, window)).abs().max() < 1e-5, (n_q, held)


def test_window_block_mask_docstring_example():
    mask = window_block_mask(3, 5, 4, torch.device("cpu"))
    q, k = torch.arange(3)[:, None], torch.arange(5)[None, :]
    seen = mask.mask_mod(torch.tensor(0), torch.tensor(0), q, k).int().tolist()
    assert seen == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]


@pytest.mark.parametrize("window", [1, 3, 7, None])
def test_flex_model_equals_the_dense_path(window):
    """The model's flex path over the rolling buffer (chunks below, at and above the window) against dense."""
    model = reference_pair(tiny_args(sliding_window=window, n_layers=1), seed=4)[1]
    tokens = torch.randint(0, 101, (40,), generator=torch.Generator().manual_seed(4))
    dense = chunked(set_block(model, None), tokens, 1)
    for chunk in (3, 8, 40):
        assert_close(chunked(set_block(model, 2, flex=True), tokens, chunk), dense)


def test_flex_scores_counts_whole_tiles():
    t = FLEX_TILE
    assert flex_scores(1, 1, None) == 1
    assert flex_scores(2 * t, 2 * t, None) == t * t + t * 2 * t  # causal: the diagonal tiles in full
    # W = t after t held keys: the first tile row reaches keys 1..2t-1 (tiles 0, 1), the second t+1..3t-1 (1, 2)
    assert flex_scores(2 * t, 3 * t, t) == 2 * (t * 2 * t)
    assert flex_scores(10, 3 * t, t) == 10 * (3 * t - t)  # ten queries at keys 3t-10.. reach from 2t-9: tiles 1, 2
