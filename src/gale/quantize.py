"""fp32 weights -> GGUF block records, and which block type each tensor of a model gets.

The quantizers are C ports of llama.cpp's reference ones (csrc/quantize.c: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the
K-quants Q4_K, Q5_K, Q6_K), so a tensor quantized here holds the blocks `llama-quantize` writes for it. A
*scheme* names a whole model's mix the way llama.cpp's file types do: `Q4_K_M` keeps the output projection in
Q6_K and gives the value projections and the FFN down projections of some layers Q6_K as well (llama.cpp's
`use_more_bits`); `Q4_0` means Q4_0 layers with a Q6_K output, as llama.cpp writes it. Norms stay fp32.
"""

from __future__ import annotations

import ctypes
import functools
import re

import numpy as np
import torch

# GGUF type -> (GGML type id, weights per block, bytes per block).
FORMATS = {
    "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210),
}
# Scheme -> (base type of the layers, llama.cpp's file type id for general.file_type).
SCHEMES = {"Q4_0": ("Q4_0", 2), "Q4_1": ("Q4_1", 3), "Q5_0": ("Q5_0", 8), "Q5_1": ("Q5_1", 9), "Q8_0": ("Q8_0", 7),
           "Q4_K_M": ("Q4_K", 15), "Q5_K_M": ("Q5_K", 17), "Q6_K": ("Q6_K", 18), "F16": ("F16", 1), "F32": ("F32", 0)}
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as llama-quantize reads them
_MIXES = ("Q4_K_M", "Q5_K_M")
# A type whose block does not divide a tensor's columns falls back to a 32-wide one (llama.cpp's fallbacks).
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


class QuantizeError(ValueError):
    """A scheme or tensor that cannot be quantized; the message says which and what can be."""


def scheme_name(scheme: str) -> str:
    """The canonical scheme of a user's spelling (`q4_k` -> `Q4_K_M`); QuantizeError for an unknown one."""
    name = ALIASES.get(scheme.upper(), scheme.upper())
    if name not in SCHEMES:
        raise QuantizeError(f"unknown quantization type {scheme!r}: choose one of "
                            f"{', '.join([*SCHEMES, *ALIASES])} (case-insensitive)")
    return name


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], scheme: str, n_layers: int, tied: bool) -> str:
    """The GGUF type llama.cpp's quantizer gives tensor `name` (Gale naming) under `scheme`: "F32" for
    vectors, "F16" for a matrix whose columns no block divides, else a key of FORMATS."""
    base = SCHEMES[scheme][0]
    if len(shape) < 2 or base in ("F16", "F32"):
        return "F32" if len(shape) < 2 else base
    cols = shape[-1]
    if name == "output.weight" or (tied and name == "tok_embeddings.weight"):
        kind = "Q8_0" if base == "Q8_0" or cols % 256 else "Q6_K"
    elif scheme in _MIXES and re.fullmatch(r"layers\.\d+\.(attention\.wv|feed_forward\.w2)\.weight", name) \
            and _more_bits(int(name.split(".")[1]), n_layers):
        kind = "Q6_K"
    else:
        kind = base
    if cols % FORMATS[kind][1]:
        kind = _FALLBACK.get(kind, kind)
    return "F16" if cols % FORMATS[kind][1] else kind


def row_bytes(kind: str, cols: int) -> int:
    _, block, size = FORMATS[kind]
    return cols // block * size


@functools.cache
def _library() -> ctypes.CDLL | None:
    """csrc/quantize.c's gale_quantize, from the kernels library (gale.quant builds every csrc/*.c into it)."""
    from .quant import kernels

    lib = kernels()
    if lib is None or not hasattr(lib, "gale_quantize"):
        return None
    lib.gale_quantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_int]
    lib.gale_quantize.restype = ctypes.c_int
    return lib


def quantize(weight: torch.Tensor, kind: str) -> np.ndarray:
    """GGUF `kind` block records of a 2-D weight, `[rows, row_bytes]` uint8 (llama.cpp's reference quantizer).

    Converts the weight to fp32 (one tensor in flight); without a C compiler the 32-wide types fall back to the
    `gguf` package's numpy quantizers (same blocks, ~20x slower) and the K-quants are refused.
    """
    if kind not in FORMATS:
        raise QuantizeError(f"no quantizer for {kind}: Gale writes {', '.join(FORMATS)}")
    rows, cols = weight.shape
    if cols % FORMATS[kind][1]:
        raise QuantizeError(f"{kind} blocks of {FORMATS[kind][1]} do not divide a row of {cols} weights")
    x = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    lib = _library()
    if lib is None:
        return _quantize_numpy(x, kind)
    out = np.empty((rows, row_bytes(kind, cols)), dtype=np.uint8)
    rc = lib.gale_quantize(FORMATS[kind][0], x.data_ptr(), out.ctypes.data, rows, cols, torch.get_num_threads())
    if rc:
        raise QuantizeError(f"the C quantizer refused {kind} for a {rows}x{cols} weight (code {rc})")
    return out


def _quantize_numpy(x: torch.Tensor, kind: str) -> np.ndarray:
    from .gguf_lib import GGMLQuantizationType, gguf

    try:
        return gguf.quants.quantize(x.numpy(), GGMLQuantizationType[kind])
    except NotImplementedError as e:
        raise QuantizeError(f"{kind} needs Gale's C quantizer, and no C compiler is available") from e


def dequantize(blocks: np.ndarray, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 values of GGUF blocks (gguf's reference dequantizer; Q4_0/Q4_1/Q8_0 through the loader's fast path)."""
    from .weights.gguf import dequantize_blocks

    return dequantize_blocks(blocks, kind, shape)
