"""Prefix caching: the store's tree and budget, and engines whose answers do not change when prompts hit it."""

import pytest
import torch
from test_engine import CharTokenizer, reference_greedy

from gale.config import ModelArgs
from gale.engine import Engine
from gale.model import Transformer
from gale.prefix import PrefixCache, common_prefix_len
from gale.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def positions_reader(calls: list):
    """A `read` whose K and V hold each position's own number: [layers=1, heads=1, n, 1]."""
    def read(a: int, b: int):
        calls.append((a, b))
        x = torch.arange(a, b, dtype=torch.float32)[None, None, :, None]
        return x, -x
    return read


def test_match_returns_the_longest_stored_prefix_in_whole_blocks():
    store, calls = PrefixCache(64, block=4), []
    store.extend(list(range(10)), 0, positions_reader(calls))
    assert calls == [(0, 8)] and len(store) == 2  # two whole blocks; the last 2 tokens wait for a third
    blocks = store.match([0, 1, 2, 3, 4, 5, 6, 7, 99])
    assert [b.tokens for b in blocks] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert torch.cat([b.k for b in blocks], dim=2).flatten().tolist() == list(range(8))
    assert torch.equal(blocks[1].v, -blocks[1].k)
    assert [b.tokens for b in store.match([0, 1, 2, 3, 4, 5, 9, 9])] == [(0, 1, 2, 3)]
    assert store.match([1, 2, 3, 4]) == []
    store.clear()
    assert len(store) == 0 and store.match(list(range(8))) == []


def test_extend_stores_only_new_blocks_that_are_still_readable():
    store, calls = PrefixCache(64, block=4), []
    read = positions_reader(calls)
    store.extend(list(range(8)), 0, read)
    store.extend(list(range(13)), 0, read)
    assert calls == [(0, 8), (8, 12)]  # blocks already there are not read again
    store.extend([50 + i for i in range(12)], 2, read)  # position 0 was overwritten: nothing can chain
    assert calls == [(0, 8), (8, 12)] and len(store) == 3


def test_budget_evicts_least_recently_used_leaves_and_keeps_a_shared_prefix():
    store = PrefixCache(12, block=2)  # 6 blocks
    read = positions_reader([])
    system = [7, 7, 8, 8]
    for q in range(10):
        store.extend(system + [q, q, q, q], 0, read)  # each question adds 2 blocks under the shared 2
        assert len(store) <= 6
        assert len(store.match(system + [q, q, q, q])) == 4
    assert len(store.match(system)) == 2  # the shared blocks are used by every prompt: never evicted
    assert store.match(system + [0, 0]) == store.match(system)  # the oldest question is gone
    assert len(store.match(system + [9, 9, 9, 9])) == 4


@pytest.mark.parametrize("at", [0, 1, 63, 64, 65, 130, 200])
def test_common_prefix_len(at):
    a = list(range(200))
    b = a[:at] + [-1] * (200 - at)
    assert common_prefix_len(a, b) == at == common_prefix_len(tuple(b), tuple(a))
    assert common_prefix_len(a, a[:at]) == at


def test_a_budget_below_one_block_is_refused():
    with pytest.raises(ValueError, match="at least"):
        PrefixCache(3, block=4)
    with pytest.raises(ValueError, match="at least"):
        Engine(Transformer(ModelArgs(dim=16, n_layers=1, head_dim=8, hidden_dim=32, n_heads=2, n_kv_heads=1,
                                     vocab_size=40)), CharTokenizer(), prefix_cache_tokens=-1)


def tiny(window: int | None) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                              vocab_size=40, sliding_window=window, max_seq_len=96)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def engine(model: Transformer, block: int = 2, tokens: int = 64, **kw) -> Engine:
    e = Engine(model, CharTokenizer(), **kw)
    e.prefixes = PrefixCache(tokens, block=block)
    return e


GREEDY = SamplingParams(max_tokens=14, ignore_eos=True)
SHARED = [3, 1, 4, 1, 5, 9, 2, 6, 5]


@pytest.mark.parametrize("window", [4, 5, None])  # W=4/5: the buffer rolls many times after the hit
@pytest.mark.parametrize("step_tokens", [3, 64])
def test_prompts_that_hit_the_store_decode_as_the_uncached_reference(window, step_tokens):
    model = tiny(window)
    e = engine(model, tokens=256, max_seqs=2, step_tokens=step_tokens)
    prompts = [SHARED + [7, 8], SHARED + [10, 11, 12, 13, 14], SHARED, SHARED + [20] * 17]
    for p in prompts:
        out = e.generate([p], [GREEDY])[0]
        assert out.token_ids == reference_greedy(model, p, GREEDY.max_tokens), p
    # Hits are whole blocks below the buffer's capacity, leaving one prompt token to compute. Blocks are
    # stored after each step: a chunk longer than the buffer has overwritten them by then.
    capacity = e.cache.capacity
    seq = e.add(SHARED + [7, 8, 0], GREEDY)
    e.step()
    assert seq.cached_tokens == (min(10, capacity // 2 * 2) if step_tokens <= capacity else 0)


def test_a_later_turn_reuses_the_earlier_answer():
    model = tiny(None)
    e = engine(model, block=4)
    first = e.generate([SHARED], [GREEDY])[0]
    turn = SHARED + first.token_ids + [30, 31, 32]
    seq = e.add(turn, GREEDY)
    out = list(e.stream([seq]))
    assert seq.cached_tokens == (len(SHARED) + GREEDY.max_tokens - 1) // 4 * 4 > len(SHARED)  # answer blocks too
    assert seq.output == reference_greedy(model, turn, GREEDY.max_tokens) and out


def test_batched_prompts_sharing_a_prefix_equal_one_by_one_and_logprobs_hold():
    model = tiny(5)
    params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=2)
    prompts = [SHARED + [i, i + 1] for i in range(6)]
    alone = [Engine(model, CharTokenizer(), prefix_cache_tokens=0).generate([p], [params])[0] for p in prompts]
    e = engine(model, tokens=6, max_seqs=3, step_tokens=4)  # 3 blocks: evictions all along
    together = e.generate(prompts, [params] * len(prompts))
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    for c, a in zip(together, alone):
        assert [lp.logprob for lp in c.logprobs] == pytest.approx([lp.logprob for lp in a.logprobs], abs=1e-5)
    assert len(e.prefixes) <= 3


def test_off_means_nothing_is_stored():
    e = Engine(tiny(None), CharTokenizer(), prefix_cache_tokens=0)
    e.generate([SHARED * 4], [GREEDY])
    seq = e.add(SHARED * 4, GREEDY)
    e.step()
    assert e.prefixes is None and seq.cached_tokens == 0


def test_real_model_chat_reuses_the_system_prompt_with_the_same_answer(smollm2_llm):
    llm = smollm2_llm
    questions = ["What is the capital of France?", "What is the capital of Italy?"]
    prompts = [llm.encode_chat([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(max_tokens=12)
    off = Engine(llm.model, llm.tokenizer, prefix_cache_tokens=0).generate(prompts, [params] * 2)
    e = Engine(llm.model, llm.tokenizer)
    first = e.generate(prompts[:1], [params])[0]
    seq = e.add(prompts[1], params)
    for _ in e.stream([seq]):
        pass
    assert [first.token_ids, seq.output] == [c.token_ids for c in off]
    assert "Paris" in first.text and seq.cached_tokens >= 16  # the template's system prompt and "user" turn


def test_a_prompt_being_prefilled_is_waited_for_not_computed_twice():
    model = tiny(None)
    e = engine(model, tokens=256, max_seqs=3, step_tokens=8)
    long, other = SHARED * 3 + [30], [33, 34, 35]  # 28 tokens: 4 steps of 8 to prefill
    seqs = [e.add(long, GREEDY), e.add(long, GREEDY), e.add(other, GREEDY)]
    e.step()
    assert e.running == [seqs[0], seqs[2]] and list(e.waiting) == [seqs[1]]  # the unrelated one goes ahead
    for _ in e.stream(seqs):
        pass
    assert seqs[1].cached_tokens == 26  # every whole block but the last prompt token's
    want = reference_greedy(model, long, GREEDY.max_tokens)
    assert seqs[0].output == seqs[1].output == want
    assert seqs[2].output == reference_greedy(model, other, GREEDY.max_tokens)
