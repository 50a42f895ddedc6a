"""GGUF files (llama.cpp): llama-architecture metadata, llama.cpp tensor names, dequantization by `gguf`.

llama.cpp's converter stores q/k rows in the interleaved RoPE layout that Gale uses, so no permutation is
needed. The header is parsed here rather than by `gguf.GGUFReader`, which takes ~6 s on a 49k-token vocabulary
(it builds a numpy view per string); tensor data is memory-mapped and dequantized one tensor at a time.
"""

from __future__ import annotations

import ctypes
import functools
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import gguf_lib
from ..config import from_gguf_metadata
from ..gguf_lib import GGML_QUANT_SIZES, GGMLQuantizationType
from .checkpoint import Checkpoint, CheckpointError

_U64 = struct.Struct("<Q")
_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
              "output.weight": "output.weight"}
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64}
# GGUF value types: scalar struct formats; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_to_gale_name(name: str) -> str | None:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def gale_to_gguf_name(name: str) -> str:
    for ours_name, theirs in ((v, k) for k, v in _TOP_NAMES.items()):
        if name == ours_name:
            return theirs
    _, i, *rest = name.split(".")
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    return f"blk.{i}.{inverse['.'.join(rest[:-1])]}.{rest[-1]}"


@functools.cache
def _library() -> ctypes.CDLL | None:
    """csrc/gguf_strings.c's gale_gguf_strings, from the kernels library (gale.quant builds every csrc/*.c)."""
    from ..quant import kernels

    lib = kernels()
    if lib is None or not hasattr(lib, "gale_gguf_strings"):
        return None
    lib.gale_gguf_strings.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.gale_gguf_strings.restype = ctypes.c_int64
    return lib


class _Header:
    """Metadata and tensor table of a GGUF file (versions 2 and 3)."""

    def __init__(self, path: Path) -> None:
        self.buf = np.memmap(path, mode="c", dtype=np.uint8)  # copy-on-write: writable views, file untouched
        self.mv, self.pos = memoryview(self.buf), 0
        magic, version = self._unpack("<4sI")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        n_tensors, n_kv = self._unpack("<QQ")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I")[0])
        self.tensors: dict[str, tuple[tuple[int, ...], GGMLQuantizationType, int]] = {}
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            kind, offset = self._unpack("<IQ")
            self.tensors[name] = (tuple(reversed(dims)), GGMLQuantizationType(kind), offset)
        align = int(self.metadata.get("general.alignment", 32))
        self.data_start = -(-self.pos // align) * align

    def _unpack(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self.mv, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        self.pos += n
        return bytes(self.mv[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def _strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary, its merges). The default model's ~100k took 0.2 s read one by
        one by _string, 0.07 s in _strings_by_struct's loop, 0.02 s packed by the C library and split once."""
        lib = _library()
        span = -1 if lib is None else lib.gale_gguf_strings(self.buf.ctypes.data + self.pos, len(self.mv) - self.pos,
                                                            count, None)
        if span < 0:  # no library, or a malformed array: the loop reports where it breaks
            return self._strings_by_struct(count)
        packed = np.empty(span - 7 * count, dtype=np.uint8)  # each 8-byte length becomes one '\0' after its string
        lib.gale_gguf_strings(self.buf.ctypes.data + self.pos, span, count, packed.ctypes.data)
        out = str(memoryview(packed), "utf-8", "replace").split("\0")
        if len(out) != count + 1:  # a string held a '\0' itself
            return self._strings_by_struct(count)
        self.pos += span
        return out[:-1]

    def _strings_by_struct(self, count: int) -> list[str]:
        """_strings in Python: struct reads the lengths, str() decodes each slice (the fastest pure-Python loop:
        int.from_bytes on slices was 2x slower)."""
        mv, pos, out = self.mv, self.pos, []
        length, append = _U64.unpack_from, out.append
        try:
            for _ in range(count):
                (n,) = length(mv, pos)
                pos += 8
                append(str(mv[pos:pos + n], "utf-8", "replace"))
                pos += n
        except struct.error as e:  # a length cut off by the end of the file
            raise ValueError(f"string array runs past the end of the file (at byte {pos} of {len(mv)})") from e
        if pos > len(mv):
            raise ValueError(f"string array runs past the end of the file ({pos} > {len(mv)} bytes)")
        self.pos = pos
        return out

    def _value(self, kind: int) -> Any:
        if kind == 8:
            return self._string()
        if kind == 9:
            item, count = self._unpack("<IQ")
            if item in _SCALARS and item != 7:
                arr = np.frombuffer(self.buf, dtype=np.dtype(_SCALARS[item]), count=count, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            if item == 8:
                return self._strings(count)
            return [self._value(item) for _ in range(count)]
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])[0]
        raise ValueError(f"unknown GGUF value type {kind} at byte {self.pos}")

    def nbytes(self, name: str) -> int:
        shape, kind, _ = self.tensors[name]
        block, size = GGML_QUANT_SIZES[kind]
        return int(np.prod(shape)) // block * size

    def raw(self, name: str) -> np.ndarray:
        shape, kind, offset = self.tensors[name]
        start = self.data_start + offset
        data = self.buf[start:start + self.nbytes(name)].view(np.ndarray)  # plain view: memmap slicing is slow
        if kind in _PLAIN:
            return data.view(_PLAIN[kind]).reshape(shape)
        return data.reshape(*shape[:-1], -1)


def read_gguf(path: Path) -> tuple[dict[str, Any], _Header]:
    try:
        header = _Header(path)
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
    return header.metadata, header


@functools.cache
def dequantize_supported(kind: GGMLQuantizationType) -> bool:
    """Whether this type can be dequantized: ours, or `gguf`'s (probed on one zero block, so new gguf releases
    just work; the probe imports the whole library, so the default model's types skip it)."""
    if kind in _PLAIN or kind in _FAST:
        return True
    block, size = GGML_QUANT_SIZES[kind]
    try:
        gguf_lib.gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), kind)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def _dequantize_legacy(raw: np.ndarray, kind: GGMLQuantizationType) -> torch.Tensor:
    """Q8_0 / Q4_0 / Q4_1 blocks of 32 (the default model's types), vectorized in torch: ~10x gguf's numpy path."""
    block, size = GGML_QUANT_SIZES[kind]
    b = torch.from_numpy(raw).reshape(-1, size)
    d = b[:, :2].contiguous().view(torch.float16).float()
    if kind == GGMLQuantizationType.Q8_0:
        return d * b[:, 2:].contiguous().view(torch.int8).float()
    qs = b[:, size - block // 2:]
    q = torch.cat((qs & 0xF, qs >> 4), dim=1).float()  # low nibbles are elements 0-15, high ones 16-31
    if kind == GGMLQuantizationType.Q4_0:
        return d * (q - 8)
    return d * q + b[:, 2:4].contiguous().view(torch.float16).float()  # Q4_1: scale and minimum


_FAST = (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


def dequantize_blocks(raw: np.ndarray, kind: str | GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 (or the stored float type) values of one tensor's GGUF records, shaped `shape`."""
    kind = GGMLQuantizationType[kind] if isinstance(kind, str) else kind
    if kind in _FAST:
        return _dequantize_legacy(raw, kind).reshape(shape)
    values = np.array(raw) if kind in _PLAIN else gguf_lib.gguf.quants.dequantize(raw, kind)
    return torch.from_numpy(values).reshape(shape)


def _read_tensor(header: _Header, name: str) -> torch.Tensor:
    shape, kind, _ = header.tensors[name]
    return dequantize_blocks(header.raw(name), kind, shape)


def open_gguf(path: Path) -> Checkpoint:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    meta, header = read_gguf(path)
    size = path.stat().st_size
    ours: dict[str, str] = {}
    unsupported: dict[str, str] = {}
    for stored, (_, kind, offset) in header.tensors.items():
        name = gguf_to_gale_name(stored) or stored
        ours[name] = stored
        if not dequantize_supported(kind):
            unsupported[name] = f"quantization type {kind.name} is not supported"
        elif header.data_start + offset + header.nbytes(stored) > size:
            raise CheckpointError(f"{path}: truncated: tensor {stored} ends past the end of the file")
    try:
        args = from_gguf_metadata(meta, tie_embeddings="output.weight" not in ours)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e
    return Checkpoint(
        path=path, format="gguf", args=args,
        shapes={n: header.tensors[s][0] for n, s in ours.items()},
        storage={n: header.tensors[s][1].name for n, s in ours.items()},
        files=dict.fromkeys(ours, path),
        read=lambda name: _read_tensor(header, ours[name]),
        read_blocks=lambda name: header.raw(ours[name]),
        gguf_metadata=meta,
        unsupported=unsupported,
    )
