"""Generated text through the engine, the Python API and the server, with the real Mistral v1 SentencePiece
tokenizer (which drops a first piece's leading space) on a tiny random model: the text of a completion is
decode(prompt + completion) less the prompt's text, streamed or not, echoed or not, offsets included."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gale.config import ModelArgs
from gale.engine import Engine
from gale.model import Transformer
from gale.tokenizer import load_tokenizer

MISTRAL_V1 = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data/tokenizer.model.v1"
PROMPTS = ["The capital of France is", "def add(a, b):\n", "Emoji 😀 and 𝔘", "a"]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """gale.LLM's parts (model, tokenizer, engine) around a random 2-layer model over Mistral's vocabulary."""
    folder = tmp_path_factory.mktemp("mistral_tok")
    (folder / "tokenizer.model").symlink_to(MISTRAL_V1)
    tok = load_tokenizer(folder)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2,
                                  vocab_size=tok.vocab_size, sliding_window=16, max_seq_len=256)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return SimpleNamespace(model=model, tokenizer=tok, engine=Engine(model, tok, max_seqs=4), path=folder)


def _generate(llm, prompts: list[list[int]], seed: int):
    from gale.sampling import SamplingParams

    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=seed + i) for i in range(len(prompts))]
    return llm.engine.generate(prompts, params)


def test_completion_text_continues_the_prompt(llm):
    tok = llm.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    for seed in range(3):
        for prompt, c in zip(prompts, _generate(llm, prompts, seed * 10)):
            whole = tok.decode(prompt + c.token_ids)
            assert whole.startswith(tok.context_text(prompt))
            assert c.text == whole[len(tok.context_text(prompt)):], (prompt, c.token_ids)


def test_streamed_equals_whole_and_keeps_the_first_space(llm):
    from gale.sampling import SamplingParams

    tok = llm.tokenizer
    prompt = tok.encode("The capital of France is")
    forced = tok.encode("The capital of France is direct request", bos=False)[len(prompt) - 1:]
    decoder = tok.decoder(prompt)
    assert "".join(decoder.push(t) for t in forced) + decoder.flush() == " direct request"
    for seed in range(3):
        (whole,) = _generate(llm, [prompt], seed)
        seq = llm.engine.add(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=seed))
        assert "".join(d for _, d in llm.engine.stream([seq])) == whole.text


def test_server_echo_text_and_offsets(llm):
    from fastapi.testclient import TestClient

    from gale.server.app import create_app

    tok = llm.tokenizer
    prompt = tok.encode("The capital of France is")
    (reference,) = _generate(llm, [prompt], 5)
    body = {"model": "m", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 1.0, "seed": 5,
            "logprobs": 0}
    with TestClient(create_app(llm, model_name="m")) as client:
        plain = client.post("/v1/completions", json=body).json()["choices"][0]
        echo = client.post("/v1/completions", json=body | {"echo": True}).json()["choices"][0]
    ids = prompt + reference.token_ids
    assert plain["text"] == reference.text and echo["text"] == tok.decode(ids)
    assert echo["text"] == tok.context_text(prompt) + plain["text"]
    # a token's offset is where its text starts: after the text the tokens before it complete
    assert echo["logprobs"]["text_offset"] == [len(tok.context_text(ids[:i])) for i in range(len(ids))]
    start = len(tok.context_text(prompt))
    assert plain["logprobs"]["text_offset"] == [start + len(tok.context_text(ids[:i])) - start
                                                for i in range(len(prompt), len(ids))]
