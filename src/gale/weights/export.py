"""`gale quantize`: any checkpoint Gale reads -> a llama-architecture GGUF that llama.cpp loads.

Tensors are quantized and written one at a time (gguf's GGUFWriter, tensor table first, then each tensor's
data as it is made), so memory holds one fp32 tensor and its blocks. The file is written under a temporary
name next to the target and renamed at the end: a full disk, an interrupt or any error leaves no partial file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelArgs
from ..gguf_lib import gguf
from ..quantize import FORMATS, SCHEMES, QuantizeError, row_bytes, scheme_name
from .checkpoint import Checkpoint, CheckpointError
from .gguf import gale_to_gguf_name
from .quantized import quantized_view


def write_gguf(ckpt: Checkpoint, out: str | Path, scheme: str, *, tokenizer: Any = None,
               progress: bool = True) -> Path:
    """Write `ckpt` quantized by `scheme` (e.g. "Q4_K_M") to `out`, with the tokenizer and chat template of
    `tokenizer` (a gale Tokenizer) in the metadata. Raises QuantizeError / CheckpointError, leaving no file."""
    from . import model_shapes

    scheme = scheme_name(scheme)
    ckpt.validate(model_shapes(ckpt.args))
    view = quantized_view(ckpt, scheme)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        _write(writer, view, scheme, tokenizer, progress, out)
        writer.close()
        os.replace(tmp, out)
    except BaseException as e:
        try:
            writer.close()
        except OSError:
            pass  # the disk that failed the write may fail the flush too
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise QuantizeError(f"{out}: the disk is full ({e.strerror}); the partial file was removed") from e
        raise
    return out


def _write(writer: gguf.GGUFWriter, view: Checkpoint, scheme: str, tokenizer: Any, progress: bool,
           out: Path) -> None:
    _add_model_metadata(writer, view.args, scheme, view.path.name)
    if tokenizer is not None:
        for key, (value, kind) in tokenizer_metadata(tokenizer, view.gguf_metadata, view.args.vocab_size).items():
            if isinstance(value, list):
                writer.add_key_value(key, value, V.ARRAY, sub_type=kind)
            else:
                writer.add_key_value(key, value, kind)
    names = view.names()
    for name in names:
        kind = view.storage[name]
        shape = view.shapes[name]
        if kind in FORMATS:
            writer.add_tensor_info(gale_to_gguf_name(name), (shape[0], row_bytes(kind, shape[1])), np.dtype(np.uint8),
                                   shape[0] * row_bytes(kind, shape[1]), raw_dtype=gguf.GGMLQuantizationType[kind])
        else:
            dtype = np.dtype(np.float16 if kind == "F16" else np.float32)
            writer.add_tensor_info(gale_to_gguf_name(name), shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    from . import _progress

    for name in _progress(names, len(names), f"writing {out.name} ({scheme})", progress):
        writer.write_tensor_data(_data(view, name))


def _data(view: Checkpoint, name: str) -> np.ndarray:
    kind = view.storage[name]
    if kind in FORMATS:
        return view.read_blocks(name)
    return view.read(name).numpy().astype(np.float16 if kind == "F16" else np.float32)


def _add_model_metadata(w: gguf.GGUFWriter, args: ModelArgs, scheme: str, name: str) -> None:
    """llama.cpp's llama-architecture keys (what its converter writes for Mistral 7B)."""
    w.add_name(name)
    w.add_file_type(SCHEMES[scheme][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    if args.sliding_window:  # llama.cpp's llama architecture ignores it; Gale reads it back
        w.add_uint32("llama.attention.sliding_window", args.sliding_window)


V = gguf.GGUFValueType
_TOKENIZER_TYPES = {"tokenizer.ggml.tokens": V.STRING, "tokenizer.ggml.merges": V.STRING,
                    "tokenizer.ggml.scores": V.FLOAT32, "tokenizer.ggml.token_type": V.INT32}


def tokenizer_metadata(tok: Any, gguf_metadata: dict[str, Any] | None = None,
                       vocab_size: int | None = None) -> dict[str, tuple[Any, Any]]:
    """GGUF `tokenizer.*` keys -> (value, GGUF value type (of the items, for a list)) for a Gale tokenizer:
    copied from a GGUF source, else built as llama.cpp's converter builds them (SentencePiece "llama",
    byte-level BPE "gpt2"), padded with unused `[PAD{i}]` tokens up to the model's vocabulary (llama.cpp
    wants one token per embedding row)."""
    if gguf_metadata is not None:
        meta = {k: v for k, v in gguf_metadata.items() if k.startswith("tokenizer.")}
    elif hasattr(tok, "sp"):
        meta = _sentencepiece_keys(tok)
    elif hasattr(tok, "tok"):
        meta = _bpe_keys(tok)
    else:
        raise CheckpointError(f"cannot write a {type(tok).__name__} tokenizer into a GGUF")
    if tok.chat_template and "tokenizer.chat_template" not in meta:
        meta["tokenizer.chat_template"] = tok.chat_template
    _pad(meta, vocab_size)
    return {k: (v, _value_type(k, v)) for k, v in meta.items() if v is not None}


def _pad(meta: dict[str, Any], vocab_size: int | None) -> None:
    tokens = meta["tokenizer.ggml.tokens"]
    if vocab_size is None or len(tokens) >= vocab_size:
        return
    extra = range(len(tokens), vocab_size)
    meta["tokenizer.ggml.tokens"] = [*tokens, *(f"[PAD{i}]" for i in extra)]
    if "tokenizer.ggml.scores" in meta:
        meta["tokenizer.ggml.scores"] = [*meta["tokenizer.ggml.scores"], *([-1000.0] * len(extra))]
    if "tokenizer.ggml.token_type" in meta:
        meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], *([5] * len(extra))]


def _value_type(key: str, value: Any) -> Any:
    if isinstance(value, list):
        return _TOKENIZER_TYPES.get(key, V.STRING if value and isinstance(value[0], str) else V.INT32)
    if isinstance(value, bool):
        return V.BOOL
    if isinstance(value, int):
        return V.UINT32
    if isinstance(value, float):
        return V.FLOAT32
    return V.STRING


def _ids(tok: Any, unk: int | None = None) -> dict[str, Any]:
    return {"tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
            "tokenizer.ggml.unknown_token_id": unk, "tokenizer.ggml.add_bos_token": bool(tok.add_bos)}


def _sentencepiece_keys(tok: Any) -> dict[str, Any]:
    sp = tok.sp
    n = sp.get_piece_size()
    kinds = [6 if sp.is_byte(i) else 3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 5 if sp.is_unused(i)
             else 1 for i in range(n)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)], "tokenizer.ggml.token_type": kinds,
            **_ids(tok, sp.unk_id() if sp.unk_id() >= 0 else None)}


def _bpe_keys(tok: Any) -> dict[str, Any]:
    """A tokenizer.json byte-level BPE as llama.cpp's "gpt2" vocabulary (pre-tokenizer "default")."""
    import json

    spec = json.loads(tok.tok.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"cannot write a {model.get('type')} tokenizer.json into a GGUF (only byte-level BPE)")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    tokens = [""] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        tokens[i] = piece
    special = {t["id"]: t.get("special", False) for t in spec.get("added_tokens", [])}
    kinds = [(3 if special[i] else 4) if i in special else 1 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": kinds, "tokenizer.ggml.merges": merges, **_ids(tok)}
