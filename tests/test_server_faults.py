"""Faults at the server: hostile values get a 4xx naming the field, a failing step fails only its requests,
a stopped engine thread turns /health unhealthy and ends the server, SIGTERM drains and exits normally."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from test_server import NAME, QUESTION, Server, free_port, with_engine

from gale.sampling import SEED_RANGE
from gale.server.app import create_app
from gale.server.shutdown import SHUTDOWN_MESSAGE, GracefulServer

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(smollm2_llm):
    s = Server(create_app(with_engine(smollm2_llm, max_seqs=4, context_len=64), model_name=NAME))
    yield s
    s.stop()


def chat(**kw) -> dict:
    return {"model": NAME, "messages": QUESTION, "max_tokens": 2, **kw}


HOSTILE = [
    (chat(seed=SEED_RANGE[1] + 1), "seed"), (chat(seed=SEED_RANGE[1], n=2), "seed"), (chat(seed=1.5), "seed"),
    (chat(temperature=1e-30), "temperature"), (chat(temperature=True), "temperature"),
    (chat(temperature="1"), "temperature"), (chat(top_k=True), "top_k"), (chat(top_k=2**40), "top_k"),
    (chat(top_p=float("nan")), "top_p"), (chat(max_tokens=True), "max_tokens"),
    (chat(max_tokens=-(2**70)), "max_tokens"),
    (chat(n=17), "n"), (chat(stop=["x"] * 17), "stop"), (chat(stop=["y" * 300]), "stop"), (chat(stop=[""]), "stop"),
    (chat(ignore_eos=1), "ignore_eos"), (chat(stream="yes"), "stream"), (chat(logprobs=1), "logprobs"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, "messages"),
]


@pytest.mark.parametrize("body,param", HOSTILE)
def test_hostile_values_get_a_4xx_naming_the_field(server, body, param):
    content = json.dumps(body)  # Python's json writes NaN, and the server's reads it
    r = httpx.post(server.url + CHAT, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param in (err["param"] or "") and param in err["message"], err


def test_hostile_completion_prompts(server):
    post = server.url + "/v1/completions"
    for prompt, param in [([1, True], "prompt"), ([2**70], "prompt"), ([[1], []], "prompt"), ([-1], "prompt")]:
        r = httpx.post(post, json={"model": NAME, "prompt": prompt, "max_tokens": 1}, timeout=60)
        assert r.status_code == 400 and param in (r.json()["error"]["param"] or ""), r.text


def test_max_tokens_is_clamped_to_the_context(server, smollm2_llm):
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 10**30, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
    prompt = len(smollm2_llm.tokenizer.encode("Once upon a time"))
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 64 - prompt


def test_a_failing_step_fails_its_requests_and_the_server_keeps_serving(server, monkeypatch):
    engine = server.server.config.app.state.gale.runner.engine
    original = engine.model.forward
    calls = []

    def once(*a, **kw):
        if not calls:
            calls.append(1)
            raise RuntimeError("simulated device error")
        return original(*a, **kw)

    monkeypatch.setattr(engine.model, "forward", once)
    r = httpx.post(server.url + CHAT, json=chat(), timeout=60)
    assert r.status_code == 500 and "simulated device error" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert httpx.post(server.url + CHAT, json=chat(), timeout=60).status_code == 200
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert not engine.running and not engine.waiting and len(engine.free_slots) == 4
    metrics = httpx.get(server.url + "/metrics").text
    assert "gale_requests_failed_total 1" in metrics


def start_graceful(llm, **kw) -> tuple[GracefulServer, threading.Thread, str]:
    """`serve`'s own server (SIGTERM drain, exit status) on a thread: the server, its thread and its URL."""
    gs = GracefulServer(create_app(llm, model_name=NAME), host="127.0.0.1", port=free_port(), log_level="warning",
                        **kw)
    thread = threading.Thread(target=gs.run, daemon=True)
    thread.start()
    while not gs.started:
        time.sleep(0.05)
    return gs, thread, f"http://127.0.0.1:{gs.config.port}"


def test_a_stopped_engine_thread_makes_the_server_unhealthy_and_exit(smollm2_llm):
    llm = with_engine(smollm2_llm, max_seqs=2)
    gs, thread, url = start_graceful(llm)

    def broken_step():
        raise SystemError("bug in the scheduler")

    llm.engine.step = broken_step
    r = httpx.post(url + CHAT, json=chat(), timeout=60)
    assert r.status_code == 503 and "bug in the scheduler" in r.json()["error"]["message"]
    thread.join(timeout=15)
    assert not thread.is_alive() and gs.exit_code == 1  # serve() exits with this status


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(smollm2_llm):
    gs, thread, url = start_graceful(with_engine(smollm2_llm, max_seqs=2), drain_timeout=60)
    body = chat(max_tokens=40, ignore_eos=True, stream=True)
    with httpx.stream("POST", url + CHAT, json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        gs.handle_exit(signal.SIGTERM, None)
        assert httpx.post(url + CHAT, json=chat(), timeout=10).status_code == 503
        assert httpx.get(url + "/health").json() == {"status": "draining"}
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
    thread.join(timeout=15)
    assert not thread.is_alive() and gs.exit_code == 0


def test_sigterm_ends_what_outlives_the_drain_timeout(smollm2_llm):
    gs, thread, url = start_graceful(with_engine(smollm2_llm, max_seqs=2), drain_timeout=0.3)
    threading.Timer(1.0, gs.handle_exit, (signal.SIGTERM, None)).start()
    r = httpx.post(url + CHAT, json=chat(max_tokens=5000, ignore_eos=True), timeout=60)
    assert r.status_code == 503 and SHUTDOWN_MESSAGE in r.json()["error"]["message"]
    thread.join(timeout=15)
    assert not thread.is_alive() and gs.exit_code == 0


def test_sigterm_exits_the_process_with_status_0(smollm2_path):
    port = free_port()
    code = (f"import gale; from gale.server.app import serve; serve(gale.load({str(smollm2_path)!r}, device='cpu', "
            f"progress=False), host='127.0.0.1', port={port}, model_name='m', api_key=None, max_queue=4)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            assert time.time() < deadline and proc.poll() is None, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stdout.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
