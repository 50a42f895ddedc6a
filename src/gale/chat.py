"""Chat formats: conversation -> token ids, token-exact with each model's reference.

A tokenizer with a chat template (from tokenizer_config.json or the GGUF) is rendered the way transformers'
`apply_chat_template` renders it. Without one (Mistral's SentencePiece tokenizer.model) the Mistral-Instruct v1
format is built exactly as mistral-common builds it:

    <s>[INST] {system}\\n\\n{user} [/INST]{answer}</s>[INST] {user2} [/INST]

where each `[INST] ... [/INST]` string and each answer is encoded on its own (so an answer starts with its
dummy-prefix space), and the system prompt joins the *first* user message (mistral-common's v1 choice;
its v2/v3 formats put it in the last one instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import cache
from typing import Any

from .tokenizer import Tokenizer

GUARDRAIL_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
    "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)
ROLES = ("system", "user", "assistant")

Messages = Sequence[dict[str, Any]]


def validate_messages(messages: Messages, *, alternate: bool = True) -> None:
    """Raise ValueError naming the first bad message: roles, string contents, system messages only first.

    With `alternate` (the Mistral format, which mistral-common's v1 tokenizer requires in effect) the messages
    after the system ones must go user, assistant, user, ... starting with a user message.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    n_system = next((i for i, m in enumerate(messages) if not isinstance(m, dict) or m.get("role") != "system"),
                    len(messages))
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({m['role']}) content must be a string, got {type(m.get('content'))}")
        if m["role"] == "system" and i >= n_system:
            raise ValueError(f"message {i} is a system message after the conversation started; put it first")
        if alternate and i >= n_system:
            expected = ("user", "assistant")[(i - n_system) % 2]
            if m["role"] != expected:
                raise ValueError(f"message {i} has role {m['role']!r} but {expected!r} was expected: after the "
                                 "system messages, user and assistant must alternate, starting with user")
            if expected == "assistant" and not m["content"]:
                raise ValueError(f"message {i} (assistant) has empty content")
    if n_system == len(messages):
        raise ValueError("messages has only system messages; add a user message")


def encode_chat(tok: Tokenizer, messages: Messages, *, safe: bool = False,
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation in the model's chat format, ready for generation (or training).

    `safe` prepends GUARDRAIL_PROMPT as a system prompt, as Mistral's API `safe_prompt` does (mistral-common has
    no such option); a system prompt of the caller's follows it after "\\n\\n", which is how mistral-common joins
    several system messages. `add_generation_prompt` only matters to templates: the Mistral format always ends
    ready for the answer after a user message.
    """
    validate_messages(messages, alternate=tok.chat_template is None)
    return _encode(tok, messages, safe, add_generation_prompt)


def encode_chat_with_mask(tok: Tokenizer, messages: Messages, *, safe: bool = False) -> tuple[list[int], list[bool]]:
    """The conversation's ids and a mask, True on exactly the assistants' answer tokens, for a fine-tuning loss.

    An answer's tokens are what the conversation up to and including it adds to the prompt that asks for it;
    a template's filler after the end-of-turn token (a newline) is left out, the end-of-turn token kept, since
    the model must learn to stop. Encoding prefixes separately assumes the format tokenizes each turn on its own;
    a format that does not is refused rather than masked wrongly.
    """
    validate_messages(messages, alternate=tok.chat_template is None)
    ids = _encode(tok, messages, safe, False)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, turn = _encode(tok, messages[:i], safe, True), _encode(tok, messages[:i + 1], safe, False)
        if ids[:len(prompt)] != prompt or ids[:len(turn)] != turn:
            raise ValueError(f"message {i}: the chat format does not encode this answer independently of its "
                             "neighbours, so its tokens cannot be told apart")
        stops = [j for j in range(len(prompt), len(turn)) if ids[j] in tok.stop_ids]
        end = stops[-1] + 1 if stops else len(turn)
        mask[len(prompt):end] = [True] * (end - len(prompt))
    return ids, mask


def _encode(tok: Tokenizer, messages: Messages, safe: bool, add_generation_prompt: bool) -> list[int]:
    if safe:
        messages = _with_guardrail(messages)
    if tok.chat_template is None:
        return _encode_mistral(tok, messages)
    text = _template(tok.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token="" if tok.bos_id is None else tok.id_to_piece(tok.bos_id),
        eos_token="" if tok.eos_id is None else tok.id_to_piece(tok.eos_id))
    return tok.encode(text, bos=False)  # templates write BOS themselves, as transformers assumes


def _with_guardrail(messages: Messages) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{GUARDRAIL_PROMPT}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": GUARDRAIL_PROMPT}, *messages]


def _encode_mistral(tok: Tokenizer, messages: Messages) -> list[int]:
    """Mistral-Instruct v1, as mistral-common's InstructTokenizerV1 (empty system prompts are dropped, as there)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    ids = [] if tok.bos_id is None else [tok.bos_id]
    first = True
    for m in messages:
        if m["role"] == "user":
            content = f"{system}\n\n{m['content']}" if first and system else m["content"]
            ids += tok.encode(f"[INST] {content} [/INST]", bos=False)
            first = False
        elif m["role"] == "assistant":
            ids += tok.encode(m["content"], bos=False) + ([] if tok.eos_id is None else [tok.eos_id])
    return ids


def _raise(message: str) -> None:
    raise ValueError(message)  # templates call raise_exception() to reject a conversation


@cache
def _template(source: str) -> Any:
    """A compiled chat template, in the environment transformers renders them in (sandboxed, same helpers)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson`: unlike jinja2's own, it does not escape HTML characters."""
    import json

    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
