"""OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI): the app's wiring, its errors, and
`serve` (uvicorn, with a graceful shutdown on SIGTERM). The routes are in `routes.py`, the response shapes in
`responses.py`, the engine thread in `runner.py`."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..llm import LLM
from .responses import APIError, error_response
from .routes import ServerState, openai, service
from .runner import EngineRunner

log = logging.getLogger("gale.server")
ALWAYS_OPEN = ("/health", "/metrics")  # answered without a key, and while draining


def create_app(llm: LLM, *, model_name: str, api_key: str | None = None, max_queue: int = 64) -> FastAPI:
    """The app over `llm`'s engine, which it drives from its own thread (stopped with the app)."""
    st = ServerState(llm, EngineRunner(llm.engine, max_queue=max_queue), model_name, api_key)

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # noqa: ANN202
        yield
        st.runner.shutdown()

    app = FastAPI(title="Gale", lifespan=lifespan)
    app.state.gale = st
    app.middleware("http")(gate)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
    app.include_router(service)
    app.include_router(openai)
    return app


async def gate(request: Request, call_next):  # noqa: ANN001, ANN201
    """The API key, and 503 for new work once a shutdown began."""
    st: ServerState = request.app.state.gale
    path = request.url.path
    if st.api_key and path != "/health" and request.headers.get("authorization", "") != f"Bearer {st.api_key}":
        return error_response(401, "missing or wrong API key (Authorization: Bearer ...)", kind="auth_error")
    if st.draining and path not in ALWAYS_OPEN:
        return error_response(503, "the server is shutting down", kind="service_unavailable")
    return await call_next(request)


async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON body: {err.get('msg')}")
    param = ".".join(loc) or None
    return error_response(400, f"{param or 'body'}: {err.get('msg')}", param)


async def api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.kind)


async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), kind="not_found" if exc.status_code == 404 else "error")


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback, answered as OpenAI's server_error (other requests are untouched)."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")


def serve(llm: LLM, *, host: str, port: int, model_name: str, api_key: str | None, max_queue: int,
          drain_timeout: float = 30.0) -> None:
    """Serve until SIGTERM (drained: exits normally) or SIGINT; exits with status 1 if the engine thread stops."""
    from .shutdown import GracefulServer

    app = create_app(llm, model_name=model_name, api_key=api_key, max_queue=max_queue)
    server = GracefulServer(app, host=host, port=port, drain_timeout=drain_timeout)
    server.run()
    if server.exit_code:
        raise SystemExit(server.exit_code)
