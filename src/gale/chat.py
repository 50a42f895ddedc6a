"""Chat formats: conversation -> token ids, token-exact with each model's reference.

A tokenizer with a chat template (from tokenizer_config.json or the GGUF) is rendered the way transformers'
`apply_chat_template` renders it. Without one (Mistral's SentencePiece tokenizer.model) the Mistral-Instruct v1
format is built exactly as mistral-common builds it:

    <s>[INST] {system}\\n\\n{user} [/INST]{answer}</s>[INST] {user2} [/INST]

where each `[INST] ... [/INST]` string and each answer is encoded on its own (so an answer starts with its
dummy-prefix space), and the system prompt joins the *first* user message (mistral-common's v1 choice;
its v2/v3 formats put it in the last one instead). As mistral-common's normalizer does, consecutive messages of
one role are merged (non-empty contents joined by "\\n\\n"), and a conversation that ends with an answer is
refused as a prompt unless it is to be continued (`continue_final`: the answer's tokens without `</s>`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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

    With `alternate` (the Mistral format) the conversation after the system messages must start with a user
    message and no answer may be empty (mistral-common's rules); consecutive messages of one role are merged.
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
        if alternate and i == n_system and m["role"] != "user":
            raise ValueError(f"message {i} has role {m['role']!r} but 'user' was expected: after the system "
                             "messages, the conversation starts with a user message")
        if alternate and m["role"] == "assistant" and not m["content"]:
            raise ValueError(f"message {i} (assistant) has empty content")
    if n_system == len(messages):
        raise ValueError("messages has only system messages; add a user message")


def encode_chat(tok: Tokenizer, messages: Messages, *, safe: bool = False, add_generation_prompt: bool = True,
                continue_final: bool = False) -> list[int]:
    """Token ids of a conversation in the model's chat format, ready for generation (or training).

    `safe` prepends GUARDRAIL_PROMPT as a system prompt, as Mistral's API `safe_prompt` does (mistral-common has
    no such option); a non-empty system prompt of the caller's follows it after "\\n\\n", which is how
    mistral-common joins several system messages. `add_generation_prompt=False` encodes a whole conversation (a
    training example: a last answer ends with `</s>`); `continue_final` makes the prompt continue the last
    message, an answer (mistral-common's and transformers' continue_final_message). In the Mistral format a
    conversation ending with an answer is otherwise refused as a prompt, as mistral-common refuses it.
    """
    validate_messages(messages, alternate=tok.chat_template is None)
    if continue_final and messages[-1]["role"] != "assistant":
        raise ValueError("continue_final needs the last message to be an assistant's answer to continue")
    if tok.chat_template is None and add_generation_prompt and not continue_final and \
            messages[-1]["role"] == "assistant":
        raise ValueError(f"message {len(messages) - 1} (assistant) ends the conversation: a prompt ends with a user "
                         "message, or asks to continue the answer (continue_final)")
    if continue_final:
        return _encode_continued(tok, messages, safe)
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
    return tok.encode(_render(tok, messages, add_generation_prompt), bos=False)  # templates write BOS themselves


def _encode_continued(tok: Tokenizer, messages: Messages, safe: bool) -> list[int]:
    """A prompt that continues the last message (an answer): without `</s>` in the Mistral format; for templates
    as transformers does it, rendering the whole conversation and cutting right after that message's text."""
    if tok.chat_template is None:
        ids = _encode(tok, messages, safe, False)
        return ids[:-1] if tok.eos_id is not None and ids[-1:] == [tok.eos_id] else ids
    tag = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker, so templates that trim text trim it the same way
    tagged = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + tag}]
    text = _render(tok, _with_guardrail(tagged) if safe else tagged, False)
    if messages[-1]["content"].strip() not in text or tag.strip() not in text:
        raise ValueError("continue_final: the chat template drops part of the last message, so it cannot be continued")
    at = text.rindex(tag.strip())
    return tok.encode(text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip(), bos=False)


def _render(tok: Tokenizer, messages: Messages, add_generation_prompt: bool) -> str:
    return _template(tok.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token="" if tok.bos_id is None else tok.id_to_piece(tok.bos_id),
        eos_token="" if tok.eos_id is None else tok.id_to_piece(tok.eos_id))


def _with_guardrail(messages: Messages) -> list[dict[str, Any]]:
    """The guardrail as the system prompt, before the caller's (dropped when empty, as mistral-common does)."""
    if messages and messages[0]["role"] == "system":
        content = "\n\n".join(c for c in (GUARDRAIL_PROMPT, messages[0]["content"]) if c)
        return [{**messages[0], "content": content}, *messages[1:]]
    return [{"role": "system", "content": GUARDRAIL_PROMPT}, *messages]


def _encode_mistral(tok: Tokenizer, messages: Messages) -> list[int]:
    """Mistral-Instruct v1, as mistral-common's InstructTokenizerV1 (empty system prompts are dropped, as there)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    ids = [] if tok.bos_id is None else [tok.bos_id]
    for i, (role, content) in enumerate(_merged(m for m in messages if m["role"] != "system")):
        if role == "user":
            content = f"{system}\n\n{content}" if i == 0 and system else content
            ids += tok.encode(f"[INST] {content} [/INST]", bos=False)
        else:
            ids += tok.encode(content, bos=False) + ([] if tok.eos_id is None else [tok.eos_id])
    return ids


def _merged(messages: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """(role, content) with consecutive messages of one role merged: non-empty contents joined by "\\n\\n"."""
    out: list[tuple[str, list[str]]] = []
    for m in messages:
        if not out or out[-1][0] != m["role"]:
            out.append((m["role"], []))
        out[-1][1].append(m["content"])
    return [(role, "\n\n".join(c for c in contents if c)) for role, contents in out]


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
