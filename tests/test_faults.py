"""Fault isolation in the engine and validation in SamplingParams: a bad value or a failing step harms only its
own sequences, and the engine goes on serving the others exactly as if they had been alone."""

import pytest
import torch
from test_engine import ARGS, PROMPTS, CharTokenizer, random_model, reference_greedy

from gale.engine import Engine, SequenceFailed, Status
from gale.lora import LoraConfig, apply_lora, merge_lora
from gale.model import Transformer
from gale.prefix import PrefixCache
from gale.sampling import SEED_RANGE, SamplingParams

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model(one_thread):
    return random_model()


def engine(model, **kw) -> Engine:
    return Engine(model, CharTokenizer(), **kw)


def run(eng: Engine, seqs) -> None:
    for _ in range(200):
        if all(s.finished for s in seqs):
            return
        eng.step()
    raise AssertionError("sequences did not finish")


def test_status_moves_from_waiting_to_finished(model):
    eng = engine(model, max_seqs=1, step_tokens=4)
    a, b = eng.add(PROMPTS[0], GREEDY), eng.add(PROMPTS[1], GREEDY)
    assert a.status is b.status is Status.WAITING
    eng.step()  # 4 of a's 13 prompt tokens; b has no slot
    assert a.status is Status.PREFILLING and b.status is Status.WAITING and a.in_cache == 4
    while a.status is Status.PREFILLING:
        eng.step()
    assert a.status is Status.DECODING and len(a.output) == 1 and a.in_cache == len(a.prompt)
    run(eng, [a, b])
    assert a.status is b.status is Status.FINISHED and a.finish_reason == "length" and eng.free_slots == [0]


def test_a_failing_sample_fails_only_its_sequence(model):
    eng = engine(model)
    good = [eng.add(p, GREEDY) for p in PROMPTS[:2]]
    bad = eng.add(PROMPTS[2], SamplingParams(max_tokens=6, temperature=1.0, seed=1))
    bad.generator = "not a generator"  # multinomial raises on this sequence's row only
    run(eng, [*good, bad])
    assert bad.finish_reason == "error" and "TypeError" in bad.error
    assert [s.output for s in good] == [reference_greedy(model, p, 6) for p in PROMPTS[:2]]
    assert not eng.running and sorted(eng.free_slots) == list(range(8))


def test_a_failing_forward_fails_its_batch_and_leaves_the_engine_consistent(model, monkeypatch):
    eng = engine(model, max_seqs=2, step_tokens=64)
    seqs = [eng.add(p, GREEDY) for p in PROMPTS[:3]]  # the third waits for a slot
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise RuntimeError("device lost")

    monkeypatch.setattr(eng.model, "forward", broken)
    changed = eng.step()
    monkeypatch.undo()
    assert set(map(id, changed)) == set(map(id, seqs[:2])) and len(calls) == 1
    assert all(s.finish_reason == "error" and "RuntimeError: device lost" in s.error for s in seqs[:2])
    assert not eng.running and eng.free_slots == [0, 1]
    later = eng.add(PROMPTS[3], GREEDY)
    run(eng, [seqs[2], later])  # the slots are reused from their start: answers as if alone
    assert seqs[2].output == reference_greedy(model, PROMPTS[2], 6)
    assert later.output == reference_greedy(model, PROMPTS[3], 6)


def test_a_failing_admission_fails_only_that_sequence(model, monkeypatch):
    eng = engine(model, max_seqs=2)
    eng.prefixes = PrefixCache(64, block=2)
    shared = list(range(1, 8))
    eng.generate([shared + [3]], [GREEDY])  # stores blocks of `shared`
    monkeypatch.setattr(eng.cache, "load", lambda *a: (_ for _ in ()).throw(MemoryError("no room")))
    hit, miss = eng.add(shared + [4], GREEDY), eng.add(PROMPTS[1], GREEDY)
    eng.step()
    monkeypatch.undo()
    assert hit.finish_reason == "error" and "MemoryError" in hit.error and hit.slot is None
    run(eng, [miss])
    assert miss.output == reference_greedy(model, PROMPTS[1], 6) and sorted(eng.free_slots) == [0, 1]


def test_the_python_api_raises_for_a_failed_sequence(model, monkeypatch):
    eng = engine(model)
    monkeypatch.setattr(eng.model, "forward", lambda *a, **kw: 1 / 0)
    with pytest.raises(SequenceFailed, match="ZeroDivisionError"):
        eng.generate([PROMPTS[0]], [GREEDY])
    assert not eng.has_work


def test_changed_weights_clear_the_prefix_cache(model):
    m = Transformer(ARGS).eval()
    m.load_state_dict(model.state_dict())
    eng = engine(m)
    eng.prefixes = PrefixCache(64, block=2)
    prompt = list(range(1, 8))
    eng.generate([prompt], [GREEDY])
    assert eng.prefixes.match(prompt)
    apply_lora(m, LoraConfig(rank=2, targets=("wk", "wv")))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.5)
    merge_lora(m)
    again = eng.add(prompt, GREEDY)
    run(eng, [again])
    assert again.cached_tokens == 0 and again.output == reference_greedy(m, prompt, 6)
    assert again.output != reference_greedy(model, prompt, 6)  # the weights did change what it computes


HOSTILE = [("seed", SEED_RANGE[1] + 1), ("seed", SEED_RANGE[0] - 1), ("seed", 1.5), ("seed", True),
           ("temperature", 1e-30), ("temperature", float("inf")), ("temperature", 10**400), ("temperature", True),
           ("top_k", True), ("top_k", 2.0), ("top_p", float("nan")), ("max_tokens", True), ("max_tokens", 2.5),
           ("stop", ["x"] * 17), ("stop", ["x" * 257]), ("stop", [1]), ("ignore_eos", 1), ("logprobs", True),
           ("stop_token_ids", [-1]), ("stop_token_ids", [True])]


@pytest.mark.parametrize("field,value", HOSTILE)
def test_hostile_sampling_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


def test_the_extreme_accepted_values_compute(model):
    eng = engine(model)
    extremes = [SamplingParams(max_tokens=3, temperature=1e-4, seed=SEED_RANGE[1], top_k=2**31 - 1),
                SamplingParams(max_tokens=3, temperature=1e300, seed=SEED_RANGE[0], top_p=1e-300),
                SamplingParams(max_tokens=10**30, temperature=0.5, seed=0, stop=["x" * 256] * 16)]
    out = eng.generate([PROMPTS[0]] * 3, extremes)
    assert [o.finish_reason for o in out[:2]] == ["length", "length"] and out[2].finish_reason in ("stop", "length")


def test_the_decode_hook_is_called_only_within_its_invariant(model):
    m = Transformer(ARGS).eval()
    m.load_state_dict(model.state_dict())
    calls = []
    m.decode_kernel = lambda h, meta, cache: calls.append(meta.decode)  # declines (None): the layers run
    out = engine(m).generate([PROMPTS[0]], [GREEDY])[0]
    assert calls and all(calls) and out.token_ids == reference_greedy(model, PROMPTS[0], 6)
    cache = engine(m).cache
    cache.prepare([0], [3])
    cache.capacity = ARGS.sliding_window + 1  # a buffer longer than the window: the kernel would see too much
    with pytest.raises(AssertionError, match="window"):
        m(torch.tensor([5]), cache.prepare([0], [1]), cache)
