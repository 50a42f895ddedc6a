"""The Python API on the real default model: answers equal transformers' greedy output on the same GGUF."""

import pytest
import torch

import gale
from gale.llm import default_model_path
from gale.weights import CheckpointError

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_default_model_is_found_without_configuration(smollm2_path):
    assert default_model_path() == smollm2_path and smollm2_path.suffix == ".gguf"


def test_greedy_chat_equals_transformers_token_by_token(smollm2_llm, smollm2_hf):
    ours = smollm2_llm.chat(QUESTION, max_tokens=24)
    ids = smollm2_llm.encode_chat(QUESTION)
    with torch.no_grad():
        theirs = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    eos = smollm2_llm.tokenizer.eos_id
    assert ours.token_ids == [t for t in theirs if t != eos][: len(ours.token_ids)]
    assert ours.token_ids == theirs[: len(ours.token_ids)]
    assert "Paris" in ours.text


def test_streamed_text_equals_non_streamed(smollm2_llm):
    full = smollm2_llm.chat(QUESTION, max_tokens=30).text
    assert "".join(smollm2_llm.stream(QUESTION, max_tokens=30)) == full


def test_batched_greedy_equals_one_by_one(smollm2_llm):
    prompts = ["The capital of Italy is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
    alone = [smollm2_llm.generate(p, max_tokens=12, ignore_eos=True).token_ids for p in prompts]
    assert [c.token_ids for c in smollm2_llm.generate(prompts, max_tokens=12, ignore_eos=True)] == alone


def test_stop_string_cuts_exactly(smollm2_llm):
    full = smollm2_llm.generate("1, 2, 3, 4, 5,", max_tokens=20, ignore_eos=True).text
    assert " 7" in full
    cut = smollm2_llm.generate("1, 2, 3, 4, 5,", max_tokens=20, stop=[" 7"], ignore_eos=True)
    assert cut.text == full[: full.index(" 7")] and cut.finish_reason == "stop"


def test_seeded_sampling_reproducible(smollm2_llm):
    def run(seed):
        return smollm2_llm.generate("My favourite colour is", max_tokens=16, temperature=1.0, seed=seed).text

    assert run(7) == run(7)
    assert len({run(s) for s in range(4)}) > 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_tokens=0)])
def test_invalid_sampling_parameters_raise(smollm2_llm, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        smollm2_llm.generate("Hi", **bad)


def test_empty_prompt_raises(smollm2_llm):
    with pytest.raises(ValueError, match="empty"):
        smollm2_llm.generate("")
    with pytest.raises(ValueError):
        smollm2_llm.chat([])


def test_safe_mode_prepends_the_guardrail(smollm2_llm):
    from gale.chat import GUARDRAIL_PROMPT

    text = smollm2_llm.tokenizer.decode(smollm2_llm.encode_chat(QUESTION, safe=True))
    assert GUARDRAIL_PROMPT in text and GUARDRAIL_PROMPT not in smollm2_llm.tokenizer.decode(
        smollm2_llm.encode_chat(QUESTION))


def test_load_dtype_errors():
    with pytest.raises(ValueError, match="dtype"):
        gale.load(dtype="int3")


@pytest.mark.parametrize("enabled", [True, False])
def test_load_pauses_the_collector_and_restores_it(smollm2_path, monkeypatch, enabled):
    import gc

    import gale.llm

    seen = []
    real = gale.llm.load_tokenizer

    def spy(*a, **kw):
        seen.append(gc.isenabled())
        return real(*a, **kw)

    monkeypatch.setattr(gale.llm, "load_tokenizer", spy)
    gc.enable() if enabled else gc.disable()
    try:
        gale.load(smollm2_path, progress=False, max_seqs=1)
        assert seen == [False] and gc.isenabled() == enabled
        with pytest.raises(CheckpointError):
            gale.load(smollm2_path.with_name("missing.gguf"), progress=False)
        assert gc.isenabled() == enabled  # restored when a load fails too
    finally:
        gc.enable()
