"""Linear layers whose weights stay in llama.cpp's 4- and 8-bit blocks (Q4_0, Q4_1, Q8_0).

Decoding one token reads every weight once, so its speed is the memory bandwidth divided by the weight
bytes: blocks of 4.5-5 bits instead of fp32 make it up to 6x faster. The product is computed by a small C
kernel (gale/csrc/gemv.c) with fp32 activations and fp32 sums, so answers stay those of the dequantized
model. It is compiled on first use with the system's C compiler into ~/.cache/gale and called through
ctypes (no Python headers, no ninja); without a compiler, models load dequantized as before.
For many vectors at once (prefill, large batches) a block is unpacked to fp32 and multiplied by
torch's GEMM, which is faster there than re-reading the blocks per vector.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

SOURCE = Path(__file__).parent / "csrc" / "gemv.c"
GEMV_MAX_VECTORS = 8  # the kernel's limit (MAX_VECTORS): a pass reads each block once for up to 8 vectors
GEMM_MIN_VECTORS = 64  # from here on, dequantize the layer and use torch's GEMM (prefill)
KINDS = ("Q4_0", "Q4_1", "Q8_0")


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, or GALE_NO_KERNELS=1): callers then keep fp32 weights."""
    if os.environ.get("GALE_NO_KERNELS") == "1":
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        flags[1] = "-mcpu=native"
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *flags, platform.machine(), _cpu_name()]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gale"
    lib = cache / f"gemv-{key.hexdigest()[:16]}.so"
    if not lib.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                out = Path(tmp) / "gemv.so"
                subprocess.run([cc, *flags, str(SOURCE), "-o", str(out)], check=True, capture_output=True, timeout=120)
                os.replace(out, lib)  # atomic: concurrent first uses never load a half-written file
        except (OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", b"") or b""
            print(f"gale: cannot compile the quantized kernels ({e}; {err.decode(errors='replace')[-300:]}); "
                  "weights will be dequantized to fp32", file=sys.stderr)
            return None
    dll = ctypes.CDLL(str(lib))  # torch has loaded libgomp already: the kernels share its OpenMP threads
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    dll.gale_q4_gemv.argtypes = [p, p, p, p, p, i64, i64, i64, i32]
    dll.gale_q8_gemv.argtypes = [p, p, p, p, i64, i64, i64, i32]
    dll.gale_q4_dequant.argtypes = [p, p, p, p, i64, i64, i32]
    dll.gale_q8_dequant.argtypes = [p, p, p, i64, i64, i32]
    return dll


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


class QuantLinear(nn.Module):
    """`y = x W^T` with W in 32-wide blocks: Q4 (16 nibble bytes, fp16 scale and offset) or Q8 (32 int8, scale).

    Inference only (no gradient). `from_gguf` takes a tensor's raw GGUF blocks, rows = output features.
    """

    def __init__(self, kind: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None,
                 in_features: int, out_features: int) -> None:
        super().__init__()
        self.kind, self.in_features, self.out_features = kind, in_features, out_features
        # Plain attributes, not buffers: CPU-only, never saved, and module attribute lookups cost
        # microseconds that add up over 200 calls per decoded token.
        self.blocks = (qs, d, m)
        self._lib = kernels()
        self._ptrs = (qs.data_ptr(), d.data_ptr(), 0 if m is None else m.data_ptr())

    @classmethod
    def from_gguf(cls, kind: str, raw: np.ndarray, out_features: int, in_features: int) -> QuantLinear:
        if kind not in KINDS or kernels() is None:
            raise ValueError(f"no kernel for {kind} blocks (or no C compiler to build it)")
        if in_features % 32:
            raise ValueError(f"in_features={in_features} is not a multiple of the 32-wide blocks")
        size = 34 if kind == "Q8_0" else 20 if kind == "Q4_1" else 18
        b = torch.from_numpy(np.ascontiguousarray(raw)).reshape(out_features, in_features // 32, size)
        d = b[..., :2].contiguous().view(torch.int16).squeeze(-1)  # fp16 bits, read by the kernel
        if kind == "Q8_0":
            return cls(kind, b[..., 2:].contiguous().view(torch.int8), d, None, in_features, out_features)
        if kind == "Q4_1":
            m = b[..., 2:4].contiguous().view(torch.int16).squeeze(-1)
        else:  # Q4_0: d * (q - 8) = d * q + (-8 d), and -8 d is exact in fp16
            m = (d.view(torch.float16) * -8).view(torch.int16)
        return cls("Q4", b[..., size - 16:].contiguous(), d, m, in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous():
            return self(x.reshape(-1, self.in_features).float().contiguous()).reshape(*x.shape[:-1], -1)
        n = x.shape[0]
        if n > GEMM_MIN_VECTORS or x.requires_grad:
            return torch.nn.functional.linear(x, self.dequantized())
        if n > GEMV_MAX_VECTORS:  # a few passes over the blocks still beat unpacking the whole layer
            return torch.cat([self(part) for part in x.split(GEMV_MAX_VECTORS)])
        y = torch.empty(n, self.out_features)
        qs, d, m = self._ptrs
        if self.kind == "Q8_0":
            self._lib.gale_q8_gemv(qs, d, x.data_ptr(), y.data_ptr(), self.out_features, self.in_features, n,
                              torch.get_num_threads())
        else:
            self._lib.gale_q4_gemv(qs, d, m, x.data_ptr(), y.data_ptr(), self.out_features, self.in_features, n,
                              torch.get_num_threads())
        return y

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight `[out, in]` (exactly the values the loaders' dequantization gives)."""
        return self._dequantize(self._ptrs, self.out_features)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """fp32 rows `index` of W: an embedding lookup over the same blocks as the tied output projection."""
        picked = [None if t is None else t[index.reshape(-1)].contiguous() for t in self.blocks]
        ptrs = tuple(0 if t is None else t.data_ptr() for t in picked)
        return self._dequantize(ptrs, index.numel()).reshape(*index.shape, self.in_features)

    def _dequantize(self, ptrs: tuple[int, int, int], rows: int) -> torch.Tensor:
        """`rows` fp32 rows from the blocks at `ptrs` (all of W, or rows gathered from it)."""
        w = torch.empty(rows, self.in_features)
        qs, d, m = ptrs
        if self.kind == "Q8_0":
            self._lib.gale_q8_dequant(qs, d, w.data_ptr(), rows, self.in_features, torch.get_num_threads())
        else:
            self._lib.gale_q4_dequant(qs, d, m, w.data_ptr(), rows, self.in_features, torch.get_num_threads())
        return w

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}"


class QuantEmbedding(nn.Module):
    """Token embeddings read from the blocks of a tied output projection: no fp32 copy of the vocabulary."""

    def __init__(self, table: QuantLinear) -> None:
        super().__init__()
        self.table = (table,)  # not a submodule: the output projection owns it

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[0].rows(tokens)
