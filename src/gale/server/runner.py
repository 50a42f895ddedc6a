"""Drive an Engine from a background thread for asyncio callers (the HTTP server).

The engine is single-threaded by design: only the runner's thread touches it. Requests arrive as
commands on a queue between steps; each request gets an asyncio.Queue of `Update`s, filled from the
engine thread with `call_soon_threadsafe`. A cancelled request (client gone) leaves the batch before
the next step. An exception inside a step fails the requests in that batch and the runner keeps going.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ..engine import Engine, Sequence
from ..sampling import SamplingParams, TokenLogprob

T = TypeVar("T")


class Overloaded(RuntimeError):
    """Every slot is busy and the waiting queue is full."""


@dataclass
class Update:
    text: str
    logprobs: list[TokenLogprob]
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache


@dataclass
class Handle:
    prompt: list[int]
    params: SamplingParams
    updates: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    seq: Sequence | None = None
    sent_tokens: int = 0
    done: bool = False

    def push(self, update: Update) -> None:
        self.loop.call_soon_threadsafe(self.updates.put_nowait, update)


@dataclass
class Metrics:
    requests: int = 0
    rejected: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    running: int = 0
    waiting: int = 0
    tokens_per_s: float = 0.0
    _window: list[tuple[float, int]] = field(default_factory=list)

    def record_step(self, n_tokens: int) -> None:
        now = time.monotonic()
        self.generated_tokens += n_tokens
        self._window = [(t, n) for t, n in self._window if now - t < 10] + [(now, n_tokens)]
        span = max(now - self._window[0][0], 1e-3)
        self.tokens_per_s = sum(n for _, n in self._window) / span if len(self._window) > 1 else 0.0


class EngineRunner:
    def __init__(self, engine: Engine, *, max_queue: int = 64) -> None:
        self.engine, self.max_queue = engine, max_queue
        self.metrics = Metrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._outstanding = 0
        self._lock = threading.Lock()
        self._stop = False
        self._by_seq: dict[int, Handle] = {}
        self._thread = threading.Thread(target=self._run, name="gale-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], params: SamplingParams) -> Handle:
        """Queue a request (raises ValueError for a bad prompt, Overloaded when full)."""
        self.engine.check_prompt(prompt)
        with self._lock:
            if self._outstanding >= self.engine.cache.max_seqs + self.max_queue:
                self.metrics.rejected += 1
                raise Overloaded(f"server is full: {self._outstanding} requests running or waiting")
            self._outstanding += 1
            self.metrics.requests += 1
        handle = Handle(prompt, params, asyncio.Queue(), asyncio.get_running_loop())
        self._send(("add", handle))
        return handle

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps: the model is only ever used from that thread."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._send(("call", (fn, loop, future)))
        return await future

    def cancel(self, handle: Handle) -> None:
        if not handle.done:
            self._send(("cancel", handle))

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # -- engine thread ----------------------------------------------------------------------
    def _finish(self, handle: Handle, update: Update) -> None:
        handle.done = True
        if handle.seq is not None:
            self._by_seq.pop(handle.seq.id, None)
        with self._lock:
            self._outstanding -= 1
        handle.push(update)

    def _apply(self, kind: str, arg: Handle | tuple) -> None:
        if kind == "call":
            fn, loop, future = arg
            try:
                result, error = fn(), None
            except Exception as e:  # noqa: BLE001 - handed to the caller
                result, error = None, e
            loop.call_soon_threadsafe(_resolve, future, result, error)
        elif kind == "add":
            arg.seq = self.engine.add(arg.prompt, arg.params)
            self._by_seq[arg.seq.id] = arg
        elif kind == "cancel" and not arg.done:
            self.engine.cancel(arg.seq)
            self._finish(arg, Update("", [], [], finish_reason="cancelled"))

    def _run(self) -> None:
        while not self._stop:
            while not self._commands.empty():
                self._apply(*self._commands.get())
            self.metrics.running, self.metrics.waiting = len(self.engine.running), len(self.engine.waiting)
            if not self.engine.has_work:
                self._wake.wait()
                self._wake.clear()
                continue
            batch = list(self.engine.running)
            try:
                progressed = self.engine.step()
            except Exception as e:  # noqa: BLE001 - one bad step must not take the server down
                for seq in batch + list(self.engine.waiting):
                    if seq.id in self._by_seq:
                        self.engine.cancel(seq)
                        self._finish(self._by_seq[seq.id], Update("", [], [], error=f"{type(e).__name__}: {e}"))
                continue
            self.metrics.record_step(len(progressed))
            for seq in progressed:
                handle = self._by_seq.get(seq.id)
                if handle is None:
                    continue
                new = slice(handle.sent_tokens, len(seq.output))
                handle.sent_tokens = len(seq.output)
                update = Update(seq.take_delta(), seq.logprobs[new], seq.output[new], seq.finish_reason,
                                prompt_tokens=len(seq.prompt), completion_tokens=len(seq.output),
                                cached_tokens=seq.cached_tokens)
                if new.start == 0:  # the request's first token: its prompt is done
                    self.metrics.prompt_tokens += len(seq.prompt)
                    self.metrics.cached_prompt_tokens += seq.cached_tokens
                if seq.finished:
                    self._finish(handle, update)
                else:
                    handle.push(update)


def _resolve(future: asyncio.Future, result: object, error: Exception | None) -> None:
    if future.done():  # the caller has gone away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
