"""Log-likelihood scoring against log_softmax of plain one-shot forwards."""

import pytest
import torch

from gale.config import ModelArgs
from gale.model import Transformer
from gale.scoring import score_continuations, sequence_logprobs


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


def test_bad_inputs():
    m = model_for()
    with pytest.raises(ValueError, match="empty"):
        score_continuations(m, [([1], [])])
    with pytest.raises(ValueError, match="context"):
        score_continuations(m, [([], [1])])
