"""OpenAI request bodies. Unknown fields are accepted (clients send many); known ones are typed strictly (no
`true` for a number, no "5" for an integer). Value ranges are SamplingParams' (gale.sampling), checked when the
request becomes engine work, so the Python API and the server refuse the same values."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..sampling import MAX_LOGPROBS

MAX_N = 16  # samples per prompt
STRICT = ConfigDict(extra="allow", strict=True)


class _Request(BaseModel):
    model_config = STRICT

    model: str
    max_tokens: int | None = Field(default=None)
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    ignore_eos: bool = False


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    safe_prompt: bool = False
    continue_final_message: bool = False  # vLLM's and transformers' name; mistral-common's continue mode


class ModerationRequest(BaseModel):
    model_config = STRICT

    input: str | list[str]
    model: str | None = None


class TokenizeRequest(BaseModel):
    model_config = STRICT
    prompt: str
    add_special_tokens: bool = True  # BOS as the model adds it; False: the text's tokens alone


class DetokenizeRequest(BaseModel):
    model_config = STRICT
    tokens: list[int]
