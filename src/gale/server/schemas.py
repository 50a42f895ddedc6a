"""OpenAI request bodies. Unknown fields are accepted (clients send many); known ones are type-checked."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None)
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    ignore_eos: bool = False


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    safe_prompt: bool = False


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input: str | list[str]
    model: str | None = None


class TokenizeRequest(BaseModel):
    prompt: str
    add_special_tokens: bool = True  # BOS as the model adds it; False: the text's tokens alone


class DetokenizeRequest(BaseModel):
    tokens: list[int]
