"""Scheduler and sampling on a tiny random model with a character tokenizer (no files needed)."""

import pytest
import torch

from gale.cache import RollingCache
from gale.config import ModelArgs
from gale.engine import Engine, _stop_prefix_len
from gale.model import Transformer
from gale.sampling import SamplingParams, filter_logits

ARGS = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=40,
                 sliding_window=6, max_seq_len=200)
EOS = 39


class CharTokenizer:
    """Token i is the character chr(ord('a') + i % 26); EOS ends a sequence."""

    stop_ids = frozenset({EOS})

    class _Decoder:
        def push(self, token_id: int) -> str:
            return chr(ord("a") + token_id % 26)

        def flush(self) -> str:
            return ""

    def decoder(self, context=()):
        return self._Decoder()


def random_model() -> Transformer:
    """The tiny model of ARGS with N(0, 0.3) weights (seed 0): peaked enough that greedy picks are clear."""
    torch.manual_seed(0)
    m = Transformer(ARGS).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.fixture(scope="module")
def model():
    return random_model()


def engine(model, **kw) -> Engine:
    return Engine(model, CharTokenizer(), **kw)


def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full re-forward of the whole sequence each step (no cache at all)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor(ids))[-1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [5], [7, 7, 7, 30, 31, 2, 9], list(range(30))]


def test_greedy_equals_uncached_reference_past_the_window(model):
    out = engine(model).generate([PROMPTS[0]], [SamplingParams(max_tokens=25, ignore_eos=True)])[0]
    assert out.token_ids == reference_greedy(model, PROMPTS[0], 25)
    assert out.finish_reason == "length" and out.completion_tokens == 25


@pytest.mark.parametrize("step_tokens", [4, 64])  # small budget: prompts are prefilled across many steps
def test_batched_greedy_equals_one_by_one(model, step_tokens):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = [engine(model).generate([p], [params])[0].token_ids for p in PROMPTS]
    together = engine(model, max_seqs=3, step_tokens=step_tokens).generate(PROMPTS, [params] * len(PROMPTS))
    assert [c.token_ids for c in together] == alone


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    def run(seed):
        p = SamplingParams(max_tokens=20, temperature=1.0, seed=seed, ignore_eos=True)
        return engine(model).generate([PROMPTS[2]], [p])[0].token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_seeded_sampling_does_not_depend_on_batch_neighbours(model):
    p = SamplingParams(max_tokens=15, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    alone = engine(model).generate([PROMPTS[0]], [p])[0].token_ids
    together = engine(model).generate([PROMPTS[0], PROMPTS[3]], [p, SamplingParams(max_tokens=15, seed=9)])
    assert together[0].token_ids == alone


def test_stop_string_cuts_text_exactly(model):
    full = engine(model).generate([PROMPTS[0]], [SamplingParams(max_tokens=20, ignore_eos=True)])[0].text
    stop = full[5:8]
    out = engine(model).generate([PROMPTS[0]], [SamplingParams(max_tokens=20, stop=[stop], ignore_eos=True)])[0]
    assert out.finish_reason == "stop"
    assert out.text == full[: full.find(stop)]


def test_streamed_text_equals_final_text_and_holds_back_stop_prefixes(model):
    full = engine(model).generate([PROMPTS[0]], [SamplingParams(max_tokens=20, ignore_eos=True)])[0].text
    stop = full[10:13] + "#"  # starts like the output, never completes: held back, then released
    eng = engine(model)
    seq = eng.add(PROMPTS[0], SamplingParams(max_tokens=20, stop=[stop], ignore_eos=True))
    pieces = [d for _, d in eng.stream([seq])]
    assert "".join(pieces) == full == seq.text


def test_stop_token_ends_without_appearing(model):
    first = reference_greedy(model, PROMPTS[0], 10)
    k = next(i for i in range(1, 10) if first[i] not in first[:i])  # a token that is new at step k
    out = engine(model).generate([PROMPTS[0]], [SamplingParams(max_tokens=10, stop_token_ids=[first[k]])])[0]
    assert out.finish_reason == "stop" and out.token_ids == first[:k]


def test_context_limit_stops_with_length(model):
    eng = engine(model, context_len=20)
    out = eng.generate([PROMPTS[0]], [SamplingParams(max_tokens=100, ignore_eos=True)])[0]
    assert out.finish_reason == "length" and len(PROMPTS[0]) + out.completion_tokens == 20
    with pytest.raises(ValueError, match="prompt has 20 tokens"):
        eng.generate([list(range(20))], [SamplingParams()])
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[]], [SamplingParams()])
    assert not eng.has_work  # rejected prompts leave nothing queued


def test_windowed_model_runs_past_its_context_when_allowed(model):
    eng = engine(model, context_len=10_000)
    out = eng.generate([PROMPTS[0]], [SamplingParams(max_tokens=300, ignore_eos=True)])[0]
    assert out.completion_tokens == 300
    assert eng.cache.allocated == ARGS.sliding_window  # memory stayed at W positions


def test_cancel_frees_the_slot_at_once(model):
    eng = engine(model, max_seqs=1)
    a = eng.add(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
    b = eng.add(PROMPTS[1], SamplingParams(max_tokens=3, ignore_eos=True))
    eng.step()
    assert a.slot == 0 and b.slot is None
    eng.cancel(a)
    assert a.finish_reason == "cancelled"
    eng.step()
    assert b.slot == 0


def test_logprobs_are_log_probabilities(model):
    p = SamplingParams(max_tokens=3, logprobs=5, ignore_eos=True)
    out = engine(model).generate([PROMPTS[2]], [p])[0]
    assert len(out.logprobs) == 3
    for lp, tok in zip(out.logprobs, out.token_ids):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top) == 5 and lp.top[0][1] == pytest.approx(lp.logprob)  # greedy picks the top token
        assert sum(torch.tensor([v for _, v in lp.top]).exp()) <= 1 + 1e-5


BAD_PARAMS = [("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0),
              ("top_k", -1), ("stop", [""]), ("logprobs", 21)]


@pytest.mark.parametrize("field,value", BAD_PARAMS)
def test_invalid_sampling_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, 1.0, 0, 0.8)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, 1.0, 0, 0.81)).tolist() == [False, False, False, True]
    assert torch.isinf(filter_logits(logits, 1.0, 0, 0.1)).tolist() == [False, True, True, True]


def test_stop_prefix_holdback():
    assert _stop_prefix_len("hello wor", ["world"]) == 3
    assert _stop_prefix_len("hello", ["xyz"]) == 0


def test_engine_cache_follows_model_dtype(model):
    half = Transformer(ARGS).to(torch.bfloat16).eval()
    eng = engine(half)
    assert isinstance(eng.cache, RollingCache) and eng.cache.k[0].dtype == torch.bfloat16
    assert eng.generate([PROMPTS[0]], [SamplingParams(max_tokens=5, ignore_eos=True)])[0].completion_tokens == 5
