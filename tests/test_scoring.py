"""Log-likelihood scoring against log_softmax of plain one-shot forwards."""

import pytest
import torch

from gale.config import ModelArgs
from gale.model import Transformer
from gale.scoring import _shared_groups, score_continuations, sequence_logprobs


def model_for(**kw) -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(**{**dict(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2,
                               vocab_size=30, sliding_window=5, max_seq_len=64), **kw})
    m = Transformer(args).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def direct(model: Transformer, ids: list[int]) -> torch.Tensor:
    """log p(ids[i+1] | ids[:i+1]) for every i, from one forward."""
    with torch.no_grad():
        lp = model(torch.tensor(ids[:-1])).log_softmax(-1)
    return lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_continuation_scores_equal_direct_forward():
    m = model_for()
    pairs = [([1, 2, 3, 4, 5, 6, 7], [8, 9]), ([1, 2, 3, 4, 5, 6, 7], [10]), ([1, 2, 3, 4, 5, 6, 7], [11]),
             ([3], [4, 5, 6, 7, 8, 9, 10, 11, 12]), ([20, 21], [22])]
    scores = score_continuations(m, pairs, max_batch_tokens=12)  # forces several batches
    for (ctx, cont), s in zip(pairs, scores):
        ref = direct(m, ctx + cont)[-len(cont):]
        assert s.logprobs == pytest.approx(ref.tolist(), abs=1e-5)
        assert s.total == pytest.approx(float(ref.sum()), abs=1e-4)


@pytest.mark.parametrize("window", [8, None])  # W=8: the shared part fills the buffer, the rest rolls it
def test_inputs_that_begin_alike_compute_their_beginning_once_with_the_same_scores(window):
    m = model_for(sliding_window=window)
    g = torch.Generator().manual_seed(2)
    shots = torch.randint(0, 30, (12,), generator=g).tolist()  # "few-shot examples" shared by every question
    questions = [torch.randint(0, 30, (n,), generator=g).tolist() for n in (1, 4, 9, 20)]
    pairs = [(shots + q, [a]) for q in questions for a in (3, 4)] + [(shots[:5], [6, 7]), ([9], [1])]
    shared = score_continuations(m, pairs, max_batch_tokens=40, min_shared=4)
    alone = score_continuations(m, pairs, min_shared=10**6)
    for (ctx, cont), s, a in zip(pairs, shared, alone):
        assert s.logprobs == pytest.approx(a.logprobs, abs=1e-5)
        assert s.logprobs == pytest.approx(direct(m, ctx + cont)[-len(cont):].tolist(), abs=1e-5)
        assert s.greedy == a.greedy


def test_shared_groups_stop_before_needed_logits_and_at_the_buffer():
    keys = [(1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 5, 7), (1, 2, 3, 9), (8, 8, 8, 8)]
    wanted = {0: 5, 1: 5, 2: 3, 3: 3}
    groups, alone = _shared_groups(keys, wanted, 3, model_for(sliding_window=None))
    assert groups == [(3, [0, 1, 2])] and alone == [3]  # row 2 needs position 3's logits: 3 shared, not 5
    groups, alone = _shared_groups(keys, {**wanted, 2: 2}, 3, model_for(sliding_window=None))
    assert groups == [(5, [0, 1])] and sorted(alone) == [2, 3]
    groups, _ = _shared_groups(keys, wanted, 3, model_for(sliding_window=4))  # capacity 4: at most 4 shared
    assert groups == [(3, [0, 1, 2])]
    groups, _ = _shared_groups(keys[:2], wanted, 3, model_for(sliding_window=4))
    assert groups == [(4, [0, 1])]


def test_greedy_flag():
    m = model_for()
    ctx = [1, 2, 3]
    with torch.no_grad():
        best = int(m(torch.tensor(ctx))[-1].argmax())
    a, b = score_continuations(m, [(ctx, [best]), (ctx, [(best + 1) % 30])])
    assert a.greedy and not b.greedy
    assert a.total > b.total


def test_context_is_cut_on_the_left_to_fit():
    m = model_for(max_seq_len=8)
    ctx, cont = list(range(1, 20)), [3, 4]
    (s,) = score_continuations(m, [(ctx, cont)])
    ids = (ctx + cont)[-9:]
    assert s.logprobs == pytest.approx(direct(m, ids)[-2:].tolist(), abs=1e-5)


def test_rolling_logprobs_through_the_window_equal_one_shot():
    m = model_for(max_seq_len=64)
    ids = torch.randint(0, 30, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    assert sequence_logprobs(m, ids, chunk=7) == pytest.approx(direct(m, ids).tolist(), abs=1e-5)


def test_full_attention_uses_overlapping_windows():
    m = model_for(sliding_window=None, max_seq_len=16)
    ids = torch.randint(0, 30, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    got = sequence_logprobs(m, ids)
    assert len(got) == 39
    assert got[:15] == pytest.approx(direct(m, ids[:16]).tolist(), abs=1e-5)  # first window: full history
    # the next window predicts targets 16..23 from ids[8:23]
    assert got[15:23] == pytest.approx(direct(m, ids[8:24])[-8:].tolist(), abs=1e-5)


def test_bad_inputs_and_empty_continuations():
    m = model_for()
    (empty, one) = score_continuations(m, [([1], []), ([1], [2])])  # nothing to score: 0, as lm-eval counts it
    assert (empty.total, empty.greedy, empty.logprobs) == (0, True, []) and len(one.logprobs) == 1
    with pytest.raises(ValueError, match="context"):
        score_continuations(m, [([], [1])])


def test_real_model_few_shot_scores_hold_with_the_shared_beginning(smollm2_llm):
    tok, model = smollm2_llm.tokenizer, smollm2_llm.model
    shots = "".join(f"Question: What is {a} plus {b}?\nAnswer: {a + b}\n\n" for a, b in [(2, 3), (10, 5), (7, 8)])
    pairs = [(tok.encode(f"{shots}Question: What is {a} plus {b}?\nAnswer:"), tok.encode(f" {c}", bos=False))
             for a, b in [(1, 1), (4, 4), (6, 3)] for c in (a + b, a + b + 1)]
    keys = [tuple(c + x)[:-1] for c, x in pairs]
    groups, _ = _shared_groups(keys, {i: len(c) - 1 for i, (c, _) in enumerate(pairs)}, 32, model)
    assert len(groups) == 1 and len(groups[0][1]) == 6 and groups[0][0] >= 32  # the shots are computed once
    shared = score_continuations(model, pairs)
    alone = score_continuations(model, pairs, min_shared=10**6)
    assert [s.total for s in shared] == pytest.approx([a.total for a in alone], abs=1e-4)
    assert [s.greedy for s in shared] == [a.greedy for a in alone]
    assert sum(s.total > t.total for s, t in zip(shared[::2], shared[1::2])) >= 2  # it can add small numbers
