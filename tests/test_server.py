"""The OpenAI-compatible server on loopback, driven by the official `openai` client and raw HTTP."""

import copy
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from gale.engine import Engine
from gale.scoring import score_continuations
from gale.server.app import create_app

NAME = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def with_engine(llm, **kw):
    """The same weights behind a fresh engine (own slots and limits)."""
    other = copy.copy(llm)
    other.engine = Engine(llm.model, llm.tokenizer, **kw)
    return other


@pytest.fixture(scope="module")
def server(smollm2_llm):
    s = Server(create_app(with_engine(smollm2_llm, max_seqs=8), model_name=NAME))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in ("gale_requests_total", "gale_generated_tokens_total", "gale_running_sequences",
                 "gale_waiting_sequences", "gale_tokens_per_second"):
        assert name in text


def test_chat_answers_and_matches_the_python_api(client, smollm2_llm):
    r = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=20, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.content == smollm2_llm.chat(QUESTION, max_tokens=20).text
    assert r.usage.prompt_tokens == len(smollm2_llm.encode_chat(QUESTION))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_a_shared_prompt_beginning_is_reported_as_cached(server, client):
    def metric(name: str) -> float:
        line = next(x for x in httpx.get(server.url + "/metrics").text.splitlines() if x.startswith(name + " "))
        return float(line.split()[1])

    hits = metric("gale_prefix_cache_hit_tokens_total")
    ask = [{"role": "user", "content": "Name a colour of the rainbow, one word only."}]
    first = client.chat.completions.create(model=NAME, messages=ask, max_tokens=6, temperature=0)
    again = client.chat.completions.create(model=NAME, messages=ask, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < again.usage.prompt_tokens  # whole blocks, the last prompt token always computed
    assert metric("gale_prefix_cache_hit_tokens_total") - hits >= cached
    assert metric("gale_prompt_tokens_total") >= 2 * again.usage.prompt_tokens


def test_streamed_chat_equals_non_streamed(client):
    kw = dict(model=NAME, messages=QUESTION, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completion_stop_and_length(client):
    r = client.completions.create(model=NAME, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    full = r.choices[0].text
    stop = full.strip()[2:4]
    r2 = client.completions.create(model=NAME, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].text == full[: full.find(stop)]


def test_n_and_seed_are_reproducible(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Write a word."}], max_tokens=8, temperature=1.0)
    a = client.chat.completions.create(**kw, n=3, seed=7)
    b = client.chat.completions.create(**kw, n=3, seed=7)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_safe_prompt_adds_the_guardrail(server, smollm2_llm):
    # SmolLM2's template writes a default system prompt; the guardrail takes its place, so compare exact counts.
    body = {"model": NAME, "messages": QUESTION, "max_tokens": 1}
    plain = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    safe = httpx.post(server.url + "/v1/chat/completions", json={**body, "safe_prompt": True}, timeout=60).json()
    assert plain["usage"]["prompt_tokens"] == len(smollm2_llm.encode_chat(QUESTION))
    assert safe["usage"]["prompt_tokens"] == len(smollm2_llm.encode_chat(QUESTION, safe=True))
    assert safe["usage"]["prompt_tokens"] != plain["usage"]["prompt_tokens"]


CONTINUED = [*QUESTION, {"role": "assistant", "content": "The capital of France is"}]


def test_continue_final_message_continues_the_answer(server, smollm2_llm):
    from gale.chat import encode_chat

    body = {"model": NAME, "messages": CONTINUED, "max_tokens": 3, "temperature": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json={**body, "continue_final_message": True}, timeout=60)
    prompt = encode_chat(smollm2_llm.tokenizer, CONTINUED, continue_final=True)
    answer = r.json()["choices"][0]["message"]["content"]
    assert r.json()["usage"]["prompt_tokens"] == len(prompt)
    assert answer == smollm2_llm.generate_ids([prompt], max_tokens=3)[0].text and "Paris" in answer
    # without it, SmolLM2's template closes the given answer and opens a new one
    plain = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert plain["usage"]["prompt_tokens"] == len(encode_chat(smollm2_llm.tokenizer, CONTINUED)) > len(prompt)


def test_continue_final_message_in_the_mistral_format(smollm2_llm):
    """A tokenizer without a chat template speaks Mistral's [INST] format: an answer last is refused unless it is
    continued, and the continued prompt is the whole conversation without its `</s>`."""
    from gale.chat import encode_chat

    llm = with_engine(smollm2_llm, max_seqs=2)
    llm.tokenizer = copy.copy(llm.tokenizer)
    llm.tokenizer.chat_template = None
    s = Server(create_app(llm, model_name=NAME))
    try:
        body = {"model": NAME, "messages": CONTINUED, "max_tokens": 2, "temperature": 0}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and "continue_final_message" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/chat/completions", json={**body, "continue_final_message": True}, timeout=60)
        whole = encode_chat(llm.tokenizer, CONTINUED, add_generation_prompt=False)
        assert whole[-1] == llm.tokenizer.eos_id and r.json()["usage"]["prompt_tokens"] == len(whole) - 1
    finally:
        s.stop()


def test_logprobs(client):
    r = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=3, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 3 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)
    c = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=2)
    assert len(c.choices[0].logprobs.content) == 3


def test_echo_scores_the_prompt_as_the_model_does(server, smollm2_llm):
    tok = smollm2_llm.tokenizer
    ids = tok.encode("The capital of France is Paris. It is a big city")
    body = {"model": NAME, "prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    scores = score_continuations(smollm2_llm.model, [(ids[:i], [ids[i]]) for i in range(1, len(ids))])
    assert lp["token_logprobs"][1:-1] == pytest.approx([s.total for s in scores], abs=1e-4)
    # lm-eval's greedy test: the token's logprob equals the best of its top-1 alternatives
    assert [t == max(top.values()) for t, top in zip(lp["token_logprobs"][1:-1], lp["top_logprobs"][1:-1])] == [
        s.greedy for s in scores]
    text, offsets = choice["text"], lp["text_offset"]
    assert text.startswith(tok.decode(ids)) and len(offsets) == len(ids) + 1
    assert [text[a:b] for a, b in zip(offsets, offsets[1:] + [len(text)])] == lp["tokens"]

    body.update(max_tokens=0, logprobs=0)  # scoring only
    only = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]
    assert only["text"] == tok.decode(ids) and only["logprobs"]["token_logprobs"] == lp["token_logprobs"][:-1]


def test_token_id_prompts_are_checked(server, client):
    post = server.url + "/v1/completions"
    for prompt in ([[1, 2], []], [5, 10**9], [[-1]]):
        r = httpx.post(post, json={"model": NAME, "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = httpx.post(post, json={"model": NAME, "prompt": "hi", "echo": True, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
    r = client.completions.create(model=NAME, prompt=[[1, 2, 3], [4, 5]], max_tokens=2, temperature=0)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 5


def test_tokenizer_endpoints(server, smollm2_llm):
    tok = smollm2_llm.tokenizer
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.id_to_piece(tok.eos_id) and info["chat_template"] == tok.chat_template
    r = httpx.post(server.url + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert r["tokens"] == [tok.eos_id]
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("Hello world", bos=False)
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Hello world"
    assert httpx.post(server.url + "/detokenize", json={"tokens": [10**9]}).status_code == 400


def test_lm_eval_local_completions_end_to_end(server, smollm2_llm):
    """lm-evaluation-harness's own OpenAI client scores a local task through echo + logprobs."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = Path(__file__).parent / "data" / "eval" / "piqa.jsonl"
    task = {"task": "tiny_piqa", "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "{{label}}",
            "doc_to_choice": "{{[sol1, sol2]}}", "output_type": "multiple_choice",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    args = (f"model={NAME},base_url={server.url}/v1/completions,tokenizer_backend=remote,"
            "tokenized_requests=True,num_concurrent=1,max_retries=1")
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[task], bootstrap_iters=0,
                                  task_manager=TaskManager(include_defaults=False), verbosity="ERROR",
                                  log_samples=True)
    tok = smollm2_llm.tokenizer
    pairs, got = [], []
    for sample in out["samples"]["tiny_piqa"]:
        for (context, continuation), ((ll, _),) in zip(sample["arguments"], sample["resps"]):
            ctx = tok.encode(context, bos=False)
            pairs.append((ctx, tok.encode(context + continuation, bos=False)[len(ctx):]))
            got.append(ll)
    assert len(got) == 4
    assert got == pytest.approx([s.total for s in score_continuations(smollm2_llm.model, pairs)], abs=1e-3)


def test_concurrent_requests_equal_alone(server, client):
    questions = [f"Name a colour and the number {i}." for i in range(16)]

    def ask(q):
        msgs = [{"role": "user", "content": q}]
        return client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)

    alone = [ask(q).choices[0].message.content for q in questions[:4]]
    with ThreadPoolExecutor(16) as pool:
        together = [r.choices[0].message.content for r in pool.map(ask, questions)]
    assert together[:4] == alone


def running(server) -> int:
    text = httpx.get(server.url + "/metrics").text
    return int(float(next(line.split()[1] for line in text.splitlines() if line.startswith("gale_running"))))


def test_disconnect_mid_stream_frees_the_slot(server):
    body = {"model": NAME, "messages": QUESTION, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    deadline = time.time() + 20
    while running(server):
        assert time.time() < deadline, "the abandoned stream kept its slot"
        time.sleep(0.1)


BAD = [
    ({"model": NAME, "messages": QUESTION, "temperature": -1}, "temperature"),
    ({"model": NAME, "messages": QUESTION, "top_p": 0}, "top_p"),
    ({"model": NAME, "messages": QUESTION, "top_p": 1.5}, "top_p"),
    ({"model": NAME, "messages": QUESTION, "max_tokens": 0}, "max_tokens"),
    ({"model": NAME, "messages": QUESTION, "max_tokens": "many"}, "max_tokens"),
    ({"model": NAME}, "messages"),
    ({"messages": QUESTION}, "model"),
    ({"model": NAME, "messages": []}, "messages"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi " * 9000}]}, "messages"),
    ({"model": NAME, "messages": QUESTION, "continue_final_message": True}, "continue_final_message"),
    ({"model": NAME, "messages": CONTINUED, "continue_final_message": "yes"}, "continue_final_message"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_chat_requests_get_a_4xx_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert param in (err["param"] or "") + err["message"]


def test_bad_requests_do_not_disturb_the_server(server, client):
    post = server.url + "/v1/completions"
    assert httpx.post(post, content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    r = httpx.post(post, json={"model": "gpt-9", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert httpx.post(post, json={"model": NAME, "prompt": ""}).status_code == 400
    assert httpx.post(post, json={"model": NAME, "prompt": "hi", "n": 0}).status_code == 400
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_sse_ends_with_done(server):
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "text_completion" for line in lines[:-1])


def test_api_key_and_overload(smollm2_llm):
    s = Server(create_app(with_engine(smollm2_llm, max_seqs=1), model_name=NAME, api_key="sekret", max_queue=0))
    try:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200
        auth = {"Authorization": "Bearer sekret"}
        body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True}
        with ThreadPoolExecutor(3) as pool:
            codes = sorted(pool.map(lambda _: httpx.post(s.url + "/v1/completions", json=body, headers=auth,
                                                         timeout=120).status_code, range(3)))
        assert codes[0] == 200 and 429 in codes
    finally:
        s.stop()
