"""The HTTP routes: OpenAI's completions, chat completions, models and moderations; vLLM's tokenizer endpoints;
health and metrics. Every route reads the server's `ServerState` from `app.state.gale` (see `state`)."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..chat import encode_chat
from ..llm import LLM
from ..sampling import ParamError, SamplingParams, TokenLogprob
from ..scoring import prompt_logprobs
from ..tokenizer import Tokenizer
from . import responses as fmt
from .responses import APIError
from .runner import EngineDead, EngineRunner, Handle, Overloaded, Update
from .schemas import ChatRequest, CompletionRequest, DetokenizeRequest, ModerationRequest, TokenizeRequest, _Request


@dataclass
class ServerState:
    """What the routes share: the model, the engine's runner, and the server's own settings."""

    llm: LLM
    runner: EngineRunner
    model_name: str
    api_key: str | None = None
    draining: bool = False  # a shutdown began: new requests get 503, running ones finish

    @property
    def tok(self) -> Tokenizer:
        return self.llm.tokenizer


def state(request: Request) -> ServerState:
    return request.app.state.gale


State = Annotated[ServerState, Depends(state)]
service = APIRouter()  # health, metrics, models, tokenizer endpoints
openai = APIRouter()  # the generation endpoints


# -- service routes ----------------------------------------------------------------------------
@service.get("/health")
async def health(st: State) -> JSONResponse:
    """200 while the server takes requests; 503 once it is draining for a shutdown or its engine stopped."""
    if not st.runner.alive:
        return JSONResponse({"status": "unhealthy", "error": st.runner.failure}, status_code=503)
    if st.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


@service.get("/v1/models")
async def models(st: State) -> dict:
    return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": 0, "owned_by": "gale"}]}


@service.get("/metrics")
async def metrics(st: State) -> PlainTextResponse:
    m = st.runner.metrics
    rows = [("requests_total", "counter", m.requests), ("requests_rejected_total", "counter", m.rejected),
            ("requests_finished_total", "counter", m.finished), ("requests_cancelled_total", "counter", m.cancelled),
            ("requests_failed_total", "counter", m.failed),
            ("generated_tokens_total", "counter", m.generated_tokens),
            ("prompt_tokens_total", "counter", m.prompt_tokens),
            ("prefix_cache_hit_tokens_total", "counter", m.cached_prompt_tokens),
            ("running_sequences", "gauge", m.running),
            ("waiting_sequences", "gauge", m.waiting), ("tokens_per_second", "gauge", round(m.tokens_per_s, 3))]
    text = "".join(f"# TYPE gale_{k} {t}\ngale_{k} {v}\n" for k, t, v in rows)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


# vLLM's tokenizer endpoints: lm-evaluation-harness's `local-completions` tokenizes through them.
@service.get("/tokenizer_info")
async def tokenizer_info(st: State) -> dict:
    tok = st.tok

    def text(i: int | None) -> str | None:
        return None if i is None else tok.id_to_piece(i)

    return {"bos_token": text(tok.bos_id), "eos_token": text(tok.eos_id), "pad_token": None,
            "add_bos_token": tok.add_bos, "chat_template": tok.chat_template,
            "model_max_length": st.llm.engine.context_len, "vocab_size": tok.vocab_size}


@service.post("/tokenize")
async def tokenize(req: TokenizeRequest, st: State) -> dict:
    tok = st.tok
    special = tok.token_to_id(req.prompt)  # a control token's own text (lm-eval asks for "</s>")
    if special is not None and special in (tok.bos_id, tok.eos_id, *tok.stop_ids):
        ids = [special]
    else:
        ids = tok.encode(req.prompt, bos=None if req.add_special_tokens else False)
    return {"tokens": ids, "count": len(ids), "max_model_len": st.llm.engine.context_len}


@service.post("/detokenize")
async def detokenize(req: DetokenizeRequest, st: State) -> dict:
    vocab = st.tok.vocab_size
    if bad := [t for t in req.tokens if not 0 <= t < vocab]:
        raise APIError(400, f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}", "tokens")
    return {"prompt": st.tok.decode(req.tokens)}


# -- generation routes -------------------------------------------------------------------------
@openai.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, st: State):  # noqa: ANN201
    check_model(st, req)
    prompts = completion_prompts(st, req.prompt)
    if req.echo and req.stream:
        raise APIError(400, "echo with stream is not supported: ask for one of them", "echo")
    score_only = req.echo and req.max_tokens == 0  # OpenAI's way to get the prompt's logprobs alone
    handles = [] if score_only else submit(st, prompts, req, 16, req.logprobs, "prompt")
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": st.model_name}
    piece = st.tok.token_text
    if req.stream:
        def chunk(i: int, u: Update) -> dict:
            return fmt.completion_chunk(base, i, u, piece, req.logprobs is not None)

        return StreamingResponse(stream_events(st, handles, chunk), media_type="text/event-stream")
    results = [Update("", [], [], "length") for _ in prompts for _ in range(req.n)] if score_only else \
        await collect(st, request, handles)
    choices = await completion_choices(st, req, prompts, results)
    return {**base, "choices": choices, "usage": fmt.usage(results, prompts)}


async def completion_choices(st: ServerState, req: CompletionRequest, prompts: list[list[int]],
                             results: list[Update]) -> list[dict]:
    """Choices of a finished completion: the answer (after the echoed prompt), its logprobs and offsets."""
    tok, piece = st.tok, st.tok.token_text
    prompt_texts = [tok.context_text(p) for p in prompts] if req.echo or req.logprobs is not None else []
    prompt_lps: list[list[TokenLogprob | None]] = [[] for _ in prompts]
    if req.echo and req.logprobs is not None:  # the model scores the prompt too (lm-eval's loglikelihood)
        prompt_lps = [[None, *await st.runner.call(functools.partial(prompt_logprobs, st.llm.model, p, req.logprobs))]
                      for p in prompts]

    def choice(i: int, u: Update) -> dict:
        p = i // req.n
        lp = None
        if req.logprobs is not None and req.echo:
            ids = prompts[p] + u.token_ids
            lp = fmt.completion_logprobs(piece, ids, prompt_lps[p] + u.logprobs, text_offsets(st, ids, [], 0))
        elif req.logprobs is not None:
            lp = fmt.completion_logprobs(piece, u.token_ids, u.logprobs,
                                         text_offsets(st, u.token_ids, prompts[p], len(prompt_texts[p])))
        text = prompt_texts[p] + u.text if req.echo else u.text
        return {"index": i, "text": text, "finish_reason": u.finish_reason, "logprobs": lp}

    return [choice(i, u) for i, u in enumerate(results)]


@openai.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request, st: State):  # noqa: ANN201
    check_model(st, req)
    prompt = chat_prompt(st, req)
    k = (req.top_logprobs or 0) if req.logprobs else None
    handles = submit(st, [prompt], req, None, k, "messages")
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": st.model_name}
    piece = st.tok.token_text
    if req.stream:
        started: set[int] = set()

        def chunk(i: int, u: Update) -> dict:
            first = i not in started
            started.add(i)
            return fmt.chat_chunk(base, i, u, piece, req.logprobs, first)

        return StreamingResponse(stream_events(st, handles, chunk), media_type="text/event-stream")
    results = await collect(st, request, handles)
    return {**base, "object": "chat.completion", "usage": fmt.usage(results, [prompt]),
            "choices": [fmt.chat_choice(i, u, piece, req.logprobs) for i, u in enumerate(results)]}


def chat_prompt(st: ServerState, req: ChatRequest) -> list[int]:
    """The conversation's prompt; `continue_final_message` continues the last message, which must be an answer
    (in the Mistral format without its `</s>`, as mistral-common's continue mode)."""
    messages = [m.model_dump() for m in req.messages]
    last = len(messages) - 1
    if req.continue_final_message and messages[-1]["role"] != "assistant":
        raise APIError(400, f"continue_final_message continues the last message, which must be an assistant's "
                       f"answer; message {last} is a {messages[-1]['role']!r} message", "continue_final_message")
    if st.tok.chat_template is None and messages[-1]["role"] == "assistant" and not req.continue_final_message:
        raise APIError(400, f"message {last} (assistant) ends the conversation: end with a user message, or set "
                       "continue_final_message to continue that answer", "messages")
    try:
        return encode_chat(st.tok, messages, safe=req.safe_prompt, continue_final=req.continue_final_message)
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None


@openai.post("/v1/moderations")
async def moderations(req: ModerationRequest, st: State) -> dict:
    """OpenAI's moderation shape, scored by self-reflection (gale.safety); `model` is accepted and ignored."""
    from .. import safety

    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts or any(not t.strip() for t in texts):
        raise APIError(400, "input must be a non-empty string or list of non-empty strings", "input")
    try:
        mods = await call(st, functools.partial(safety.moderate, st.llm, texts))
    except ValueError as e:
        raise APIError(400, str(e), "input") from None
    return {"id": f"modr-{uuid.uuid4().hex}", "model": st.model_name,
            "results": [fmt.moderation_result(m, safety.HARM_CATEGORIES) for m in mods]}


# -- requests into engine work -------------------------------------------------------------------
def model_aliases(st: ServerState) -> list[str]:
    """The names the one served model answers to: its served name, its file name with or without .gguf, its path."""
    file = Path(st.llm.path).name
    return list(dict.fromkeys((st.model_name, file, file.removesuffix(".gguf"), str(st.llm.path))))


def check_model(st: ServerState, req: _Request) -> None:
    """Any other name is refused with the list, so a client's typo does not pass silently."""
    aliases = model_aliases(st)
    if req.model not in aliases:
        raise APIError(404, f"model {req.model!r} does not exist; this server has one model, named any of "
                       f"{', '.join(map(repr, aliases))}", "model", "model_not_found")


def completion_prompts(st: ServerState, raw: str | list) -> list[list[int]]:
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
    return [st.tok.encode(t) for t in texts]


def sampling(st: ServerState, req: _Request, prompt_len: int, default_max: int | None, logprobs: int | None,
             i: int) -> SamplingParams:
    """The i-th of a request's n samples; max_tokens is clamped to what the context leaves (finish_reason
    "length" then), and the seed offset by i (distinct but reproducible choices)."""
    room = st.llm.engine.context_len - prompt_len
    given = next((m for m in (req.max_completion_tokens, req.max_tokens) if m is not None), default_max or room)
    max_tokens = min(given, room) if given >= 1 else given  # below 1: SamplingParams says what is wrong
    seed = None if req.seed is None else req.seed + i
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              seed=seed, stop=stop, ignore_eos=req.ignore_eos, logprobs=logprobs)
    except ParamError as e:
        raise APIError(400, str(e), e.param) from None


def submit(st: ServerState, prompts: list[list[int]], req: _Request, default_max: int | None,
           logprobs: int | None, param: str) -> list[Handle]:
    """Queue n samples of every prompt, all or none (a bad prompt or a full server cancels those queued)."""
    handles: list[Handle] = []
    try:
        for p in prompts:
            try:
                st.llm.engine.check_prompt(p)
            except ValueError as e:
                raise APIError(400, str(e), param) from None
            for i in range(req.n):
                handles.append(st.runner.submit(p, sampling(st, req, len(p), default_max, logprobs, i)))
    except (APIError, ValueError, Overloaded, EngineDead) as e:
        for h in handles:
            st.runner.cancel(h)
        if isinstance(e, Overloaded):
            raise APIError(429, str(e), kind="server_overloaded") from None
        if isinstance(e, EngineDead):
            raise APIError(503, str(e), kind="service_unavailable") from None
        if isinstance(e, ValueError):
            raise APIError(400, str(e), param) from None
        raise
    return handles


async def call(st: ServerState, fn: Callable[[], object]) -> object:
    """Run `fn` on the engine thread (503 when the engine has stopped)."""
    try:
        return await st.runner.call(fn)
    except EngineDead as e:
        raise APIError(503, str(e), kind="service_unavailable") from None


async def collect(st: ServerState, request: Request, handles: list[Handle]) -> list[Update]:
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
                    raise fmt.update_error(u)
                text.append(u.text)
                lps += u.logprobs
                ids += u.token_ids
                if u.finish_reason:
                    results.append(Update("".join(text), lps, ids, u.finish_reason, prompt_tokens=u.prompt_tokens,
                                          completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens))
                    break
    finally:
        for h in handles:
            st.runner.cancel(h)
    return results


async def merged(st: ServerState, handles: list[Handle]) -> AsyncIterator[tuple[int, Update]]:
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
            st.runner.cancel(h)


async def stream_events(st: ServerState, handles: list[Handle], make_chunk: Callable[[int, Update], dict],
                        ) -> AsyncIterator[str]:
    async for i, u in merged(st, handles):
        if u.error:
            yield fmt.sse_error(u)
            return
        if u.text or u.finish_reason or u.logprobs:
            yield fmt.sse(make_chunk(i, u))
    yield fmt.sse("[DONE]")


def text_offsets(st: ServerState, ids: list[int], context: list[int], start: int) -> list[int]:
    """Where each token's text starts in the returned text (tokens that end inside a character share it)."""
    decoder, out, pos = st.tok.decoder(context), [], start
    for t in ids:
        out.append(pos)
        pos += len(decoder.push(t))
    return out
