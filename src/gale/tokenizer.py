"""Tokenizers behind one small interface: SentencePiece and HF `tokenizers`, from a model folder or GGUF metadata.

A GGUF carries no tokenizer file, only llama.cpp's vocabulary keys, so both kinds are rebuilt from those keys:
a "llama" vocabulary becomes a real SentencePiece model (so it encodes exactly like the original tokenizer.model),
a "gpt2" vocabulary becomes a byte-level BPE built the way transformers builds it (transformers is the reference).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import sentencepiece
import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers.models import BPE

# Control tokens that end a turn or a document: an answer can never contain them, so generation stops on them
# even where the file's eos is another token (SmolLM2/Qwen end turns with <|im_end|>, documents with <|endoftext|>).
END_TOKENS = ("</s>", "<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
              "<end_of_turn>")

_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6  # llama.cpp token types; SentencePiece numbers its piece types the same

# transformers' GGUF_PRE_TOKENIZER_SPLITS (integrations/gguf/gguf_tokenizer_mapping.py): how `tokenizer.ggml.pre`
# names the regex a byte-level vocabulary's merges were learned with. Unnamed ones use GPT-2's regex.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
}

_STREAM_CONTEXT = 6  # context ids a StreamDecoder keeps: enough for leading-space and multi-byte characters


class Tokenizer:
    """What the engine, the chat formats and the server need from a tokenizer, whatever library backs it."""

    def __init__(self, *, bos_id: int | None, eos_id: int | None, add_bos: bool, chat_template: str | None,
                 vocab_size: int, extra_stop_ids: Iterable[int] = ()) -> None:
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.chat_template, self.vocab_size = chat_template, vocab_size
        ends = {i for i in map(self.token_to_id, END_TOKENS) if i is not None and self._is_control(i)}
        self.stop_ids = frozenset({*ends, *extra_stop_ids, *([] if eos_id is None else [eos_id])})

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first when `bos` (None: the model's own default, `add_bos`)."""
        ids = self._encode(text)
        return [self.bos_id, *ids] if (self.add_bos if bos is None else bos) and self.bos_id is not None else ids

    def decoder(self, context: Sequence[int] = ()) -> StreamDecoder:
        """A streaming detokenizer; `context` (e.g. the prompt) makes the first piece read as its continuation."""
        return StreamDecoder(self, context)

    def context_text(self, ids: Sequence[int]) -> str:
        """The text of `ids` that tokens after them cannot change: what a decoder given them as context follows.

        decode(ids) less an incomplete character at its end, which a continuation's text starts with once completed
        (so context_text(prompt) + completion text == decode(prompt + completion), as `echo` returns it).
        """
        return settled(self.decode(ids))

    def token_text(self, token_id: int) -> str:
        """The text one token adds after other text (its leading space kept, which decoding it alone drops)."""
        anchor = self._anchor()
        return self.decode([anchor, token_id])[len(self.decode([anchor])):]

    @cache  # noqa: B019 - one entry per tokenizer, which lives as long as its model
    def _anchor(self) -> int:
        return self._encode("a")[-1]

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _is_control(self, token_id: int) -> bool:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, control tokens (BOS, EOS, end of turn) left out."""
        raise NotImplementedError

    def token_to_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (Mistral/Llama tokenizer.model), or one rebuilt from a GGUF "llama" vocabulary."""

    def __init__(self, sp: sentencepiece.SentencePieceProcessor, *, add_bos: bool = True,
                 chat_template: str | None = None, bos_id: int | None = None, eos_id: int | None = None) -> None:
        self.sp = sp
        bos = sp.bos_id() if bos_id is None else bos_id
        eos = sp.eos_id() if eos_id is None else eos_id
        super().__init__(bos_id=bos if bos >= 0 else None, eos_id=eos if eos >= 0 else None, add_bos=add_bos,
                         chat_template=chat_template, vocab_size=sp.get_piece_size())

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _is_control(self, token_id: int) -> bool:
        return self.sp.is_control(token_id)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def token_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)  # unknown pieces come back as the unk id
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer: tokenizer.json, or a byte-level BPE rebuilt from a GGUF "gpt2" vocabulary.

    Special tokens written in the text (`<|im_start|>`) are matched as such: chat templates rely on it.
    """

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None, add_bos: bool,
                 chat_template: str | None = None, extra_stop_ids: Iterable[int] = ()) -> None:
        self.tok = tok
        self._special = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        super().__init__(bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, chat_template=chat_template,
                         vocab_size=tok.get_vocab_size(with_added_tokens=True), extra_stop_ids=extra_stop_ids)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids  # BOS is ours to add, not the post-processor's

    def _is_control(self, token_id: int) -> bool:
        return token_id in self._special

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def id_to_piece(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id)


class StreamDecoder:
    """Incremental detokenization: the pieces after `context` join to `decode(context + ids)` less `settled(context)`.

    Decoding ids one by one is wrong twice over: SentencePiece drops the leading space of the first piece it sees,
    and a character split across byte tokens decodes as U+FFFD. So, as text-generation-inference does, a short
    window of ids (the last context ids first, which anchor the spacing) is decoded as a whole and only the text
    beyond what was already accounted for is emitted; text ending in U+FFFD waits, since the next byte may complete
    the character. The context counts only up to its own incomplete end, so a character the first generated token
    completes is emitted whole.
    """

    def __init__(self, tok: Tokenizer, context: Sequence[int] = ()) -> None:
        self._tok = tok
        self._ids = self._window(list(context))
        self._done = len(settled(tok.decode(self._ids)))  # characters of the window's text already accounted for

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes ("" while a character or a space is still undecided)."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever was held back (an incomplete character at the end of the output)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self._tok.decode(self._ids)
        ready = text if final else settled(text)
        piece = ready[self._done:]
        self._done = max(self._done, len(ready))
        if ready == text and len(self._ids) > _STREAM_CONTEXT:  # all of it shown: restart on the last ids
            self._ids = self._window(self._ids)
            self._done = len(self._tok.decode(self._ids))
        return piece

    def _window(self, ids: list[int]) -> list[int]:
        """The last ids, starting where a character does: decoders that read a run of byte tokens as a whole
        (tokenizers' ByteFallback) turn all of it into U+FFFD when it starts inside a character."""
        start = max(0, len(ids) - _STREAM_CONTEXT)
        for k in range(start, max(-1, start - 4), -1):  # a character is at most 4 byte tokens
            if not self._tok.decode(ids[k:]).startswith("\ufffd"):
                return ids[k:]
        return ids[start:]


def settled(text: str) -> str:
    """`text` without the U+FFFD it ends with: bytes of a character that later tokens may still complete."""
    return text.rstrip("\ufffd")


def load_tokenizer(path: str | Path, gguf_metadata: dict[str, Any] | None = None) -> Tokenizer:
    """The tokenizer of a model folder, a tokenizer file, or a .gguf file (read from `gguf_metadata` when given).

    A folder's SentencePiece model (tokenizer.model, tokenizer.model.v1, ...) wins over its tokenizer.json: for
    Mistral models it is the reference that mistral-common and the original weights use.
    """
    path = Path(path)
    if gguf_metadata is not None or path.suffix == ".gguf":
        return _from_gguf(gguf_metadata if gguf_metadata is not None else _read_gguf_metadata(path))
    if path.is_file():
        return _from_tokenizer_json(path) if path.suffix == ".json" else _from_sentencepiece(path)
    models = sorted(path.glob("tokenizer.model*"))
    if models:
        return _from_sentencepiece(models[0])
    if (path / "tokenizer.json").is_file():
        return _from_tokenizer_json(path / "tokenizer.json")
    raise FileNotFoundError(f"no tokenizer in {path}: looked for tokenizer.model* (SentencePiece) and tokenizer.json")


def _read_gguf_metadata(path: Path) -> dict[str, Any]:
    from .gguf_lib import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.")}


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The folder's chat template: chat_template.jinja, else tokenizer_config.json's (a string or named list)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _from_sentencepiece(model: Path) -> SentencePieceTokenizer:
    config = _json(model.parent / "tokenizer_config.json")
    return SentencePieceTokenizer(sentencepiece.SentencePieceProcessor(model_file=str(model)),
                                  add_bos=config.get("add_bos_token", True),
                                  chat_template=_chat_template(model.parent, config))


def _from_tokenizer_json(file: Path) -> HFTokenizer:
    tok = tokenizers.Tokenizer.from_file(str(file))
    config = _json(file.parent / "tokenizer_config.json")

    def token_id(name: str) -> int | None:
        token = config.get(name)
        return None if token is None else tok.token_to_id(token["content"] if isinstance(token, dict) else token)

    bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
    gen_eos = _json(file.parent / "generation_config.json").get("eos_token_id", [])
    # Without the flag, the post-processor tells whether the model wants BOS (Llama 3, Mistral HF repos add it).
    add_bos = config.get("add_bos_token", bos_id is not None and tok.encode("a").ids[:1] == [bos_id])
    return HFTokenizer(tok, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                       chat_template=_chat_template(file.parent, config),
                       extra_stop_ids=gen_eos if isinstance(gen_eos, list) else [gen_eos])


def _from_gguf(meta: dict[str, Any]) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    template = meta.get("tokenizer.chat_template")
    if kind == "llama":  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        sp = sentencepiece.SentencePieceProcessor(model_proto=_sentencepiece_proto(meta))
        return SentencePieceTokenizer(sp, add_bos=meta.get("tokenizer.ggml.add_bos_token", True),
                                      chat_template=template, bos_id=bos, eos_id=eos)
    if kind == "gpt2":
        return HFTokenizer(_byte_level_bpe(meta), bos_id=bos, eos_id=eos,
                           add_bos=meta.get("tokenizer.ggml.add_bos_token", False), chat_template=template)
    raise ValueError(f"unsupported GGUF tokenizer {kind!r}: gale reads 'llama' (SentencePiece) and 'gpt2' (BPE)")


def _sentencepiece_proto(meta: dict[str, Any]) -> bytes:
    """A serialized SentencePiece ModelProto for a GGUF "llama" vocabulary.

    Written by hand (the protobuf wire format is a few lines) because sentencepiece_model_pb2 needs the protobuf
    package, which nothing else here uses. The fields mirror a real Llama/Mistral tokenizer.model: BPE, byte
    fallback, the identity normalizer, a dummy-prefix space, whitespace escaped to U+2581 and never collapsed.
    """
    tokens, scores = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos", "padding")}
    pieces = b"".join(
        _pb(1, _pb(1, t) + _pb(2, float(scores[i] if scores else 0.0)) + _pb(3, types[i] or 1))
        for i, t in enumerate(tokens))
    trainer = b"".join([
        _pb(3, 2), _pb(4, len(tokens)), _pb(35, _BYTE in types), _pb(26, True),  # BPE, byte fallback, " " pieces
        *(_pb(n, -1 if ids[k] is None else ids[k]) for n, k in ((40, "unknown"), (41, "bos"), (42, "eos"),
                                                                 (43, "padding"))),
        *(_pb(n, tokens[ids[k]]) for n, k in ((45, "unknown"), (46, "bos"), (47, "eos"), (48, "padding"))
          if ids[k] is not None),
    ])
    normalizer = _pb(1, "identity") + _pb(3, meta.get("tokenizer.ggml.add_space_prefix", True)) + _pb(4, False) + \
        _pb(5, True)
    return pieces + _pb(2, trainer) + _pb(3, normalizer)


def _pb(field: int, value: str | bytes | bool | int | float) -> bytes:
    """One protobuf field: floats as fixed32, ints and bools as varints, strings and messages length-delimited."""
    if isinstance(value, float):
        return _varint(field << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):
        return _varint(field << 3) + _varint(int(value))
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32s are sign-extended to ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n])


@cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (transformers' bytes_to_unicode), the spelling of byte-level vocabs."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def _byte_level_bpe(meta: dict[str, Any]) -> tokenizers.Tokenizer:
    """transformers' GGUF byte-level BPE (GPT2Tokenizer + add_gguf_special_tokens + set_split_regex), rebuilt.

    Tokens not spelled in the byte alphabet are respelled into it; control tokens become special added tokens
    (unless they use characters outside the alphabet: a llama.cpp mislabel), user-defined ones plain added tokens.
    """
    spelling = _byte_alphabet()
    tokens = meta["tokenizer.ggml.tokens"]
    outside = set("".join(tokens)) - set(spelling.values())  # the characters that need respelling
    spelled = outside.isdisjoint  # 4x faster than a regex fullmatch per token (49k tokens: 22 -> 5 ms)
    vocab = dict(zip(tokens, range(len(tokens)))) if not outside else {  # the usual case: 2x faster
        t if spelled(t) else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
                            if k == _CONTROL and spelled(t)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                    if k == _USER_DEFINED and t in vocab])
    return tok
