"""Drive an Engine from a background thread for asyncio callers (the HTTP server).

The engine is single-threaded by design: only the runner's thread touches it. Requests arrive as
commands on a queue between steps; each request gets an asyncio.Queue of `Update`s, filled from the
engine thread with `call_soon_threadsafe`. A cancelled request (client gone) leaves the batch before
the next step. The engine isolates failures itself (a failing step fails only its sequences); anything else that
goes wrong on the engine thread ends it loudly: every waiting request gets the error, `alive` turns False (the
server's /health says so) and `on_death` is called (the server exits, for a supervisor to restart it).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ..engine import Engine, Sequence
from ..sampling import SamplingParams, TokenLogprob

T = TypeVar("T")
log = logging.getLogger("gale.server")


class Overloaded(RuntimeError):
    """Every slot is busy and the waiting queue is full."""


class EngineDead(RuntimeError):
    """The engine thread has stopped: no request can be served until the process restarts."""


@dataclass
class Update:
    text: str
    logprobs: list[TokenLogprob]
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None
    error_status: int = 500  # the HTTP status an error maps to (503: the server is going away)
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
    finished: int = 0  # requests answered to the end (a stop, a length limit)
    cancelled: int = 0  # requests whose client went away, or cut by a shutdown
    failed: int = 0  # requests that ended in an error
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
    def __init__(self, engine: Engine, *, max_queue: int = 64,
                 on_death: Callable[[BaseException], None] | None = None) -> None:
        self.engine, self.max_queue, self.on_death = engine, max_queue, on_death
        self.metrics = Metrics()
        self.failure: str | None = None  # why the engine thread stopped, once it has
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._outstanding = 0
        self._lock = threading.Lock()  # guards _outstanding, failure, and sending commands against _die
        self._stop = False
        self._by_seq: dict[int, Handle] = {}
        self._thread = threading.Thread(target=self._run, name="gale-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.failure is None and self._thread.is_alive()

    @property
    def outstanding(self) -> int:
        """Requests submitted and not yet finished."""
        return self._outstanding

    def submit(self, prompt: list[int], params: SamplingParams) -> Handle:
        """Queue a request (ValueError for a bad prompt, Overloaded when full, EngineDead after a crash)."""
        self.engine.check_prompt(prompt)
        handle = Handle(prompt, params, asyncio.Queue(), asyncio.get_running_loop())
        with self._lock:
            self._check_alive()
            if self._outstanding >= self.engine.cache.max_seqs + self.max_queue:
                self.metrics.rejected += 1
                raise Overloaded(f"server is full: {self._outstanding} requests running or waiting")
            self._outstanding += 1
            self.metrics.requests += 1
            self._send(("add", handle))
        return handle

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps: the model is only ever used from that thread."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._check_alive()
            self._send(("call", (fn, loop, future)))
        return await future

    def cancel(self, handle: Handle) -> None:
        if not handle.done:
            self._send(("cancel", handle))

    def cancel_all(self, reason: str) -> None:
        """End every request now with an error `reason` (HTTP 503): a shutdown's deadline has passed."""
        self._send(("cancel_all", reason))

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise EngineDead(f"the engine stopped ({self.failure}); the server is restarting")

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
        m = self.metrics
        if update.finish_reason == "cancelled":
            m.cancelled += 1
        elif update.error:
            m.failed += 1
        else:
            m.finished += 1
        handle.push(update)

    def _apply(self, kind: str, arg: Handle | tuple | str) -> None:
        if kind == "call":
            fn, loop, future = arg
            try:
                result, error = fn(), None
            except Exception as e:  # noqa: BLE001 - handed to the caller
                result, error = None, e
            loop.call_soon_threadsafe(_resolve, future, result, error)
        elif kind == "add":
            try:
                arg.seq = self.engine.add(arg.prompt, arg.params)
            except Exception as e:  # noqa: BLE001 - this request fails, the engine is untouched
                self._finish(arg, Update("", [], [], error=f"{type(e).__name__}: {e}"))
                return
            self._by_seq[arg.seq.id] = arg
        elif kind == "cancel" and not arg.done:
            self.engine.cancel(arg.seq)
            self._finish(arg, Update("", [], [], finish_reason="cancelled"))
        elif kind == "cancel_all":
            for handle in list(self._by_seq.values()):
                self.engine.cancel(handle.seq)
                self._finish(handle, Update("", [], [], finish_reason="cancelled", error=arg, error_status=503))

    def _run(self) -> None:
        try:
            while not self._stop:
                while not self._commands.empty():
                    self._apply(*self._commands.get())
                self.metrics.running, self.metrics.waiting = len(self.engine.running), len(self.engine.waiting)
                if not self.engine.has_work:
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._publish(self.engine.step())
        except BaseException as e:  # noqa: BLE001 - a bug outside the engine's own isolation: stop loudly
            self._die(e)

    def _publish(self, changed: list[Sequence]) -> None:
        """Hand each request its new tokens and text, and its end."""
        self.metrics.record_step(sum(1 for s in changed if not s.error))
        for seq in changed:
            handle = self._by_seq.get(seq.id)
            if handle is None:
                continue
            if seq.error:
                self._finish(handle, Update("", [], [], error=seq.error))
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

    def _die(self, error: BaseException) -> None:
        """Fail every request, refuse new ones, and tell the owner (which exits the process)."""
        log.critical("the engine thread stopped", exc_info=error)
        with self._lock:
            self.failure = f"{type(error).__name__}: {error}"
            pending = [self._commands.get() for _ in range(self._commands.qsize())]
        dead = Update("", [], [], error=f"the engine stopped: {self.failure}", error_status=503)
        for kind, arg in pending:
            if kind == "add":
                self._finish(arg, dead)
            elif kind == "call":
                fn, loop, future = arg
                loop.call_soon_threadsafe(_resolve, future, None, EngineDead(self.failure))
        for handle in list(self._by_seq.values()):
            self._finish(handle, dead)
        if self.on_death is not None:
            self.on_death(error)


def _resolve(future: asyncio.Future, result: object, error: Exception | None) -> None:
    if future.done():  # the caller has gone away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
