"""OpenAI response shapes: errors, logprobs, usage and server-sent events, built from the runner's `Update`s.

Pure functions (no engine, no app state): the routes decide what to send, this module how it is spelled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

from ..sampling import TokenLogprob
from .runner import Update

if TYPE_CHECKING:
    from ..safety import Moderation

TokenText = Callable[[int], str]  # a token's own text (the tokenizer's token_text)


class APIError(Exception):
    """An error a route returns to its client: HTTP status, message, the offending request field, OpenAI's type."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_response(status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, param, kind), status_code=status)


def update_error(u: Update) -> APIError:
    """The APIError of a request the engine could not finish."""
    kind = "service_unavailable" if u.error_status == 503 else "server_error"
    return APIError(u.error_status, u.error or "", kind=kind)


def completion_logprobs(piece: TokenText, ids: list[int], lps: list[TokenLogprob | None],
                        offsets: list[int] | None = None) -> dict:
    """OpenAI's legacy logprobs; an echoed prompt's first token has none (None entries)."""
    return {"tokens": [piece(t) for t in ids],
            "token_logprobs": [lp.logprob if lp else None for lp in lps],
            "top_logprobs": [{piece(t): v for t, v in lp.top} if lp else None for lp in lps],
            "text_offset": offsets or []}


def chat_logprobs(piece: TokenText, lps: list[TokenLogprob]) -> dict:
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
    """One server-sent event: a JSON object, or the literal `[DONE]`."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def sse_error(u: Update) -> str:
    e = update_error(u)
    return sse(error_body(e.message, kind=e.kind))


def completion_chunk(base: dict, i: int, u: Update, piece: TokenText, logprobs: bool) -> dict:
    lp = completion_logprobs(piece, u.token_ids, u.logprobs) if logprobs else None
    return {**base, "choices": [{"index": i, "text": u.text, "finish_reason": u.finish_reason, "logprobs": lp}]}


def chat_chunk(base: dict, i: int, u: Update, piece: TokenText, logprobs: bool, first: bool) -> dict:
    """A chat.completion.chunk; a choice's first chunk carries the assistant role."""
    delta = {"content": u.text} if u.text else {}
    if first:
        delta = {"role": "assistant", **delta}
    lp = chat_logprobs(piece, u.logprobs) if logprobs else None
    return {**base, "object": "chat.completion.chunk",
            "choices": [{"index": i, "delta": delta, "finish_reason": u.finish_reason, "logprobs": lp}]}


def chat_choice(i: int, u: Update, piece: TokenText, logprobs: bool) -> dict:
    return {"index": i, "message": {"role": "assistant", "content": u.text}, "finish_reason": u.finish_reason,
            "logprobs": chat_logprobs(piece, u.logprobs) if logprobs else None}


def moderation_result(m: Moderation, categories: tuple[str, ...]) -> dict:
    """OpenAI's moderation result for one gale.safety.Moderation."""
    return {"flagged": m.flagged, "categories": {c: m.flagged and m.category == c for c in categories},
            "category_scores": m.category_scores, "unsafe_probability": m.unsafe_probability}
