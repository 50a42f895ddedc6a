"""Property-based requests (hypothesis): whatever JSON a client sends to the server's request schema, the answer
is a 2xx or a 4xx, never a 5xx nor a hang, and a well-behaved request sent alongside is always answered the same.

Generated bodies mix valid values with hostile ones (huge and negative integers, NaN and infinities, booleans
for numbers, strings, nested junk, lone surrogates) field by field, so most requests reach the engine's own
checks with one bad field. Kept to a few hundred examples so the module runs in well under a minute;
GALE_FUZZ_EXAMPLES=N sets the examples per test for a long run (the README's figure: N=1000).
"""

import json
import os
import threading

import httpx
import pytest
from test_server import NAME, Server, with_engine

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gale.server.app import create_app  # noqa: E402

EXAMPLES = int(os.environ.get("GALE_FUZZ_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HUGE = st.sampled_from([2**63, 2**64, 2**64 + 1, -(2**63) - 1, 10**30, -(10**30)])
SCALARS = st.none() | st.booleans() | st.integers() | HUGE | st.floats(allow_nan=True, allow_infinity=True)
junk = st.recursive(
    SCALARS | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=4)


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly valid values, sometimes anything at all."""
    return st.one_of(valid, valid, junk)


SAMPLING = {
    "max_tokens": field(st.integers(-1, 3) | st.just(10**30)),
    "temperature": field(st.floats(0, 2) | st.sampled_from([1e-30, 1e-5, 1e300])),
    "top_p": field(st.floats(0, 1.5)),
    "top_k": field(st.integers(-2, 50) | HUGE),
    "seed": field(st.integers(-(2**64), 2**65)),
    "stop": field(st.none() | st.text(max_size=4) | st.lists(st.text(max_size=300), max_size=18)),
    "n": field(st.integers(0, 2) | st.just(17)),
    "stream": field(st.booleans()),
    "ignore_eos": field(st.booleans()),
}
MESSAGE = st.fixed_dictionaries({"role": field(st.sampled_from(["system", "user", "assistant", "tool"])),
                                 "content": field(st.text(max_size=20))})
CHAT = st.fixed_dictionaries({"model": field(st.just(NAME)), "messages": field(st.lists(MESSAGE, max_size=3))},
                             optional={**SAMPLING, "logprobs": field(st.booleans()),
                                       "top_logprobs": field(st.integers(-1, 22)), "safe_prompt": field(st.booleans())})
TOKEN_IDS = st.lists(st.integers(-5, 60000), max_size=5)
PROMPT = st.text(max_size=20) | st.lists(st.text(max_size=10), max_size=3) | TOKEN_IDS | st.lists(TOKEN_IDS, max_size=3)
COMPLETION = st.fixed_dictionaries({"model": field(st.just(NAME)), "prompt": field(PROMPT)},
                                   optional={**SAMPLING, "logprobs": field(st.integers(-1, 22)),
                                             "echo": field(st.booleans())})
TOKENIZE = st.fixed_dictionaries({"prompt": field(st.text(max_size=30))},
                                 optional={"add_special_tokens": field(st.booleans())})
DETOKENIZE = st.fixed_dictionaries({"tokens": field(st.lists(st.integers(-5, 60000) | HUGE, max_size=5))})
GOOD = {"model": NAME, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def fuzzed(smollm2_llm, one_thread):
    """The server, and a thread that keeps sending a well-behaved request and checks every answer."""
    s = Server(create_app(with_engine(smollm2_llm, max_seqs=4, context_len=48), model_name=NAME, max_queue=16))
    expected = httpx.post(s.url + "/v1/completions", json=GOOD, timeout=60).json()["choices"][0]["text"]
    stop, answers = threading.Event(), []

    def well_behaved():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(s.url + "/v1/completions", json=GOOD)
                answers.append((r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))
                stop.wait(0.3)

    t = threading.Thread(target=well_behaved, daemon=True)
    t.start()
    yield s
    stop.set()
    t.join(timeout=60)
    s.stop()
    assert answers and all(a == (200, expected) for a in answers), [a for a in answers if a != (200, expected)][:3]


def send(server, path: str, body: dict) -> None:
    content = json.dumps(body)  # NaN and Infinity included, as Python's json (and the server's) reads them
    with httpx.stream("POST", server.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=30) as r:
        text = r.read().decode("utf-8", errors="replace")
    assert 200 <= r.status_code < 500, (body, r.status_code, text)
    if r.status_code >= 400:
        assert "error" in json.loads(text), text
    elif body.get("stream") is True:
        assert text.rstrip().endswith("data: [DONE]") and "server_error" not in text, text


@SETTINGS
@given(body=CHAT)
def test_chat_requests_never_get_a_5xx(fuzzed, body):
    send(fuzzed, "/v1/chat/completions", body)


@SETTINGS
@given(body=COMPLETION)
def test_completion_requests_never_get_a_5xx(fuzzed, body):
    send(fuzzed, "/v1/completions", body)


@settings(SETTINGS, max_examples=max(1, EXAMPLES // 2))
@given(body=TOKENIZE | DETOKENIZE | junk)
def test_tokenizer_requests_never_get_a_5xx(fuzzed, body):
    send(fuzzed, "/tokenize", body)
    send(fuzzed, "/detokenize", body)
