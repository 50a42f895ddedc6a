"""uvicorn with a graceful shutdown: on SIGTERM the server stops admitting work (503, /health too, so a load
balancer stops routing), lets the requests in flight finish within `drain_timeout` seconds, ends the rest with a
503, and exits normally. If the engine thread stops, the server exits with status 1 for a supervisor to restart it.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from .routes import ServerState

SHUTDOWN_MESSAGE = "the server is shutting down"


def drain(st: ServerState, timeout: float) -> None:
    """Refuse new work, wait up to `timeout` s for the outstanding requests, then end what is left."""
    st.draining = True
    deadline = time.monotonic() + timeout
    while st.runner.outstanding and time.monotonic() < deadline:
        time.sleep(0.05)
    if st.runner.outstanding:
        st.runner.cancel_all(SHUTDOWN_MESSAGE)
        end = time.monotonic() + 5
        while st.runner.outstanding and time.monotonic() < end:
            time.sleep(0.05)


class GracefulServer(uvicorn.Server):
    def __init__(self, app: FastAPI, *, host: str, port: int, drain_timeout: float = 30.0,
                 log_level: str = "info") -> None:
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))
        self.state: ServerState = app.state.gale
        self.drain_timeout = drain_timeout
        self.exit_code = 0
        self.state.runner.on_death = self._engine_died

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """SIGTERM drains first (on a thread: signal handlers must return); a second signal, or SIGINT, is
        uvicorn's own (stop now)."""
        if sig == signal.SIGTERM and not self.state.draining:
            self.state.draining = True
            threading.Thread(target=self._drain, name="gale-drain", daemon=True).start()
        else:
            super().handle_exit(sig, frame)

    def _drain(self) -> None:
        drain(self.state, self.drain_timeout)
        self.should_exit = True

    def _engine_died(self, _: BaseException) -> None:
        self.exit_code = 1
        self.should_exit = True
