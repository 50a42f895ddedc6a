"""OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI)."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..chat import encode_chat, validate_messages
from ..llm import LLM
from ..sampling import ParamError, SamplingParams, TokenLogprob
from ..scoring import prompt_logprobs
from .runner import EngineRunner, Handle, Overloaded, Update
from .schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModerationRequest,
    TokenizeRequest,
    _Request,
)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def create_app(llm: LLM, *, model_name: str, api_key: str | None = None, max_queue: int = 64) -> FastAPI:
    runner = EngineRunner(llm.engine, max_queue=max_queue)
    tok = llm.tokenizer

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # noqa: ANN202
        yield
        runner.shutdown()

    app = FastAPI(title="Gale", lifespan=lifespan)
    app.state.runner = runner

    @app.middleware("http")
    async def check_key(request: Request, call_next):  # noqa: ANN001, ANN202
        if api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(401, "missing or wrong API key (Authorization: Bearer ...)", kind="auth_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {err.get('msg')}")
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'body'}: {err.get('msg')}", param)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), kind="not_found" if exc.status_code == 404 else "error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "gale"}]}

    # vLLM's tokenizer endpoints: lm-evaluation-harness's `local-completions` tokenizes through them.
    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        def text(i: int | None) -> str | None:
            return None if i is None else tok.id_to_piece(i)

        return {"bos_token": text(tok.bos_id), "eos_token": text(tok.eos_id), "pad_token": None,
                "add_bos_token": tok.add_bos, "chat_template": tok.chat_template,
                "model_max_length": llm.engine.context_len, "vocab_size": tok.vocab_size}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        special = tok.token_to_id(req.prompt)  # a control token's own text (lm-eval asks for "</s>")
        if special is not None and special in (tok.bos_id, tok.eos_id, *tok.stop_ids):
            ids = [special]
        else:
            ids = tok.encode(req.prompt, bos=None if req.add_special_tokens else False)
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.engine.context_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        if bad := [t for t in req.tokens if not 0 <= t < tok.vocab_size]:
            raise APIError(400, f"token ids outside the vocabulary [0, {tok.vocab_size}): {bad[:5]}", "tokens")
        return {"prompt": tok.decode(req.tokens)}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        m = runner.metrics
        rows = [("requests_total", "counter", m.requests), ("requests_rejected_total", "counter", m.rejected),
                ("generated_tokens_total", "counter", m.generated_tokens),
                ("prompt_tokens_total", "counter", m.prompt_tokens),
                ("prefix_cache_hit_tokens_total", "counter", m.cached_prompt_tokens),
                ("running_sequences", "gauge", m.running),
                ("waiting_sequences", "gauge", m.waiting), ("tokens_per_second", "gauge", round(m.tokens_per_s, 3))]
        text = "".join(f"# TYPE gale_{k} {t}\ngale_{k} {v}\n" for k, t, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def check_model(req: _Request) -> None:
        if req.model not in (model_name, str(llm.path)):
            raise APIError(404, f"model {req.model!r} does not exist; this server has {model_name!r}", "model",
                           "model_not_found")

    def sampling(req: _Request, prompt_len: int, default_max: int | None, logprobs: int | None, i: int):
        given = next((m for m in (req.max_completion_tokens, req.max_tokens) if m is not None), None)
        max_tokens = given if given is not None else default_max or llm.engine.context_len - prompt_len
        seed = None if req.seed is None else req.seed + i  # n > 1: distinct but reproducible choices
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k, seed=seed, stop=stop, ignore_eos=req.ignore_eos,
                                  logprobs=logprobs)
        except ParamError as e:
            raise APIError(400, str(e), e.param) from None

    def submit(prompts: list[list[int]], req: _Request, default_max: int | None, logprobs: int | None,
               param: str) -> list[Handle]:
        handles: list[Handle] = []
        try:
            for p in prompts:
                try:
                    llm.engine.check_prompt(p)
                except ValueError as e:
                    raise APIError(400, str(e), param) from None
                for i in range(req.n):
                    handles.append(runner.submit(p, sampling(req, len(p), default_max, logprobs, i)))
        except (ValueError, Overloaded) as e:
            for h in handles:
                runner.cancel(h)
            if isinstance(e, Overloaded):
                raise APIError(429, str(e), kind="server_overloaded") from None
            raise APIError(400, str(e), getattr(e, "param", param)) from None
        return handles

    async def collect(request: Request, handles: list[Handle]) -> list[Update]:
        """Wait for every handle to finish; cancel them all if the client goes away."""
        results: list[Update] = []
        try:
            for h in handles:
                text, lps, ids = [], [], []
                while True:
                    try:
                        u = await asyncio.wait_for(h.updates.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            raise asyncio.CancelledError from None
                        continue
                    if u.error:
                        raise APIError(500, u.error, kind="server_error")
                    text.append(u.text)
                    lps += u.logprobs
                    ids += u.token_ids
                    if u.finish_reason:
                        results.append(Update("".join(text), lps, ids, u.finish_reason, None, u.prompt_tokens,
                                              u.completion_tokens, u.cached_tokens))
                        break
        finally:
            for h in handles:
                runner.cancel(h)
        return results

    async def merged(handles: list[Handle]) -> AsyncIterator[tuple[int, Update]]:
        """Updates of several handles as they come, tagged with the handle's index."""
        queue: asyncio.Queue = asyncio.Queue()

        async def forward(i: int, h: Handle) -> None:
            while True:
                u = await h.updates.get()
                await queue.put((i, u))
                if u.finish_reason or u.error:
                    return

        tasks = [asyncio.create_task(forward(i, h)) for i, h in enumerate(handles)]
        try:
            for _ in range(len(handles)):
                while True:
                    i, u = await queue.get()
                    yield i, u
                    if u.finish_reason or u.error:
                        break
        finally:
            for t in tasks:
                t.cancel()
            for h in handles:
                runner.cancel(h)

    piece = tok.token_text

    def completion_logprobs(ids: list[int], lps: list[TokenLogprob | None], offsets: list[int] | None = None) -> dict:
        """OpenAI's legacy logprobs; an echoed prompt's first token has none (None entries)."""
        return {"tokens": [piece(t) for t in ids],
                "token_logprobs": [lp.logprob if lp else None for lp in lps],
                "top_logprobs": [{piece(t): v for t, v in lp.top} if lp else None for lp in lps],
                "text_offset": offsets or []}

    def chat_logprobs(lps: list[TokenLogprob]) -> dict:
        def entry(t: int, v: float) -> dict:
            s = piece(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode())}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in lps]}

    def usage(results: list[Update], prompts: list[list[int]]) -> dict:
        p = sum(len(x) for x in prompts)
        c = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": min(p, sum(r.cached_tokens for r in results))}}

    def sse(obj: dict | str) -> str:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"

    async def stream_events(handles: list[Handle], make_chunk) -> AsyncIterator[str]:  # noqa: ANN001
        async for i, u in merged(handles):
            if u.error:
                yield sse({"error": {"message": u.error, "type": "server_error", "param": None, "code": None}})
                return
            if u.text or u.finish_reason or u.logprobs:
                yield sse(make_chunk(i, u))
        yield sse("[DONE]")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):  # noqa: ANN201
        check_model(req)
        prompts = completion_prompts(req.prompt)
        if req.echo and req.stream:
            raise APIError(400, "echo with stream is not supported: ask for one of them", "echo")
        score_only = req.echo and req.max_tokens == 0  # OpenAI's way to get the prompt's logprobs alone
        handles = [] if score_only else submit(prompts, req, 16, req.logprobs, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}

        if req.stream:
            def chunk(i: int, u: Update) -> dict:
                lp = completion_logprobs(u.token_ids, u.logprobs) if req.logprobs is not None else None
                return {**base, "choices": [{"index": i, "text": u.text, "finish_reason": u.finish_reason,
                                             "logprobs": lp}]}

            return StreamingResponse(stream_events(handles, chunk), media_type="text/event-stream")
        results = [Update("", [], [], "length") for _ in prompts for _ in range(req.n)] if score_only else \
            await collect(request, handles)
        prompt_texts = [tok.decode(p) for p in prompts] if req.echo or req.logprobs is not None else []
        prompt_lps: list[list[TokenLogprob | None]] = [[] for _ in prompts]
        if req.echo and req.logprobs is not None:  # the model scores the prompt too (lm-eval's loglikelihood)
            prompt_lps = [[None, *await runner.call(functools.partial(prompt_logprobs, llm.model, p, req.logprobs))]
                          for p in prompts]

        def choice(i: int, u: Update) -> dict:
            p = i // req.n
            lp = None
            if req.logprobs is not None and req.echo:
                lp = completion_logprobs(prompts[p] + u.token_ids, prompt_lps[p] + u.logprobs,
                                         text_offsets(prompts[p] + u.token_ids, [], 0))
            elif req.logprobs is not None:
                lp = completion_logprobs(u.token_ids, u.logprobs,
                                         text_offsets(u.token_ids, prompts[p], len(prompt_texts[p])))
            text = prompt_texts[p] + u.text if req.echo else u.text
            return {"index": i, "text": text, "finish_reason": u.finish_reason, "logprobs": lp}

        return {**base, "choices": [choice(i, u) for i, u in enumerate(results)], "usage": usage(results, prompts)}

    def completion_prompts(raw: str | list) -> list[list[int]]:
        """Token-id prompts of a completion request: text, texts, token ids or lists of token ids."""
        if isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            return [list(raw)]
        if isinstance(raw, list) and raw and all(isinstance(x, list) for x in raw):
            if any(not x for x in raw):
                raise APIError(400, "a prompt of token ids is empty", "prompt")
            return [list(x) for x in raw]
        texts = [raw] if isinstance(raw, str) else raw
        if not texts or any(not isinstance(t, str) or not t for t in texts):
            raise APIError(400, "prompt must be a non-empty string, a list of them, or token ids", "prompt")
        return [tok.encode(t) for t in texts]

    def text_offsets(ids: list[int], context: list[int], start: int) -> list[int]:
        """Where each token's text starts in the returned text (tokens that end inside a character share it)."""
        decoder, out, pos = tok.decoder(context), [], start
        for t in ids:
            out.append(pos)
            pos += len(decoder.push(t))
        return out

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):  # noqa: ANN201
        check_model(req)
        messages = [m.model_dump() for m in req.messages]
        try:
            validate_messages(messages, alternate=tok.chat_template is None)
            prompt = encode_chat(tok, messages, safe=req.safe_prompt)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        k = (req.top_logprobs or 0) if req.logprobs else None
        handles = submit([prompt], req, None, k, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": model_name}

        if req.stream:
            started: set[int] = set()

            def chunk(i: int, u: Update) -> dict:
                delta = {"content": u.text} if u.text else {}
                if i not in started:
                    started.add(i)
                    delta = {"role": "assistant", **delta}
                lp = chat_logprobs(u.logprobs) if req.logprobs else None
                return {**base, "object": "chat.completion.chunk",
                        "choices": [{"index": i, "delta": delta, "finish_reason": u.finish_reason, "logprobs": lp}]}

            return StreamingResponse(stream_events(handles, chunk), media_type="text/event-stream")
        results = await collect(request, handles)
        choices = [{"index": i, "message": {"role": "assistant", "content": u.text}, "finish_reason": u.finish_reason,
                    "logprobs": chat_logprobs(u.logprobs) if req.logprobs else None} for i, u in enumerate(results)]
        return {**base, "object": "chat.completion", "choices": choices, "usage": usage(results, [prompt])}

    @app.post("/v1/moderations")
    async def moderations(req: ModerationRequest) -> dict:
        """OpenAI's moderation shape, scored by self-reflection (gale.safety); `model` is accepted and ignored."""
        from .. import safety

        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or any(not t.strip() for t in texts):
            raise APIError(400, "input must be a non-empty string or list of non-empty strings", "input")
        try:
            mods = await runner.call(functools.partial(safety.moderate, llm, texts))
        except ValueError as e:
            raise APIError(400, str(e), "input") from None
        results = [{"flagged": m.flagged,
                    "categories": {c: m.flagged and m.category == c for c in safety.HARM_CATEGORIES},
                    "category_scores": m.category_scores, "unsafe_probability": m.unsafe_probability}
                   for m in mods]
        return {"id": f"modr-{uuid.uuid4().hex}", "model": model_name, "results": results}

    return app


def serve(llm: LLM, *, host: str, port: int, model_name: str, api_key: str | None, max_queue: int) -> None:
    import uvicorn

    uvicorn.run(create_app(llm, model_name=model_name, api_key=api_key, max_queue=max_queue), host=host, port=port)
