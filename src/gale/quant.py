"""Linear layers whose weights stay in llama.cpp's blocks: Q4_0, Q4_1, Q8_0 (32 weights a block) and the
K-quants Q4_K, Q5_K, Q6_K (256-weight super-blocks: what Q4_K_M / Q5_K_M / Q6_K files are made of).

Decoding one token reads every weight once, so its speed is the memory bandwidth divided by the weight
bytes: blocks of 4.5-8.5 bits instead of fp32 make it up to 7x faster. The products are computed by small C
kernels (gale/csrc/*.c): one vector (decode at batch 1), and K-quant batches up to 64, as exact integer
products of the weights' own integers with the activations held to 16 bits per group (llama.cpp holds them
to 8, which derails small models), each row's weights widened once for four vectors (Q4_0 / Q4_1, and Q8_0 /
Q4_K / Q5_K with VNNI: eight rows at a time, their bytes transposed in registers); batches of the 32-wide
kinds with fp32 activations and sums; a decode step can run all layers in one call (DecodeKernel). They are
compiled on first use with the system's C compiler into ~/.cache/gale and called through ctypes (no Python
headers, no ninja); without a compiler, models load dequantized as before. For more than 64 vectors at once
(prefill) a layer is unpacked slice by slice and multiplied by torch's GEMM: in fp32, or, on AMX CPUs, in
fp16 (AMX-FP16) or in 16-bit integers through int8 tiles (`torch._int_mm`), 2.4-6x faster behind measured
quality gates (`gemm_dtype`); on AVX512-VNNI CPUs without AMX the kernels' own int16 GEMM (gale_gemm_int:
the one-vector arithmetic at any batch, ~2x torch's fp32 GEMM) takes batches from 8-24 vectors on.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .gguf_lib import GGML_QUANT_SIZES, GGMLQuantizationType
from .model import rope_rotations

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.c"))  # compiled into one library
GEMV_MAX_VECTORS = 8  # vectors per fp32 pass of the kernel over the blocks (MAX_VECTORS)
GEMM_MIN_VECTORS = 64  # above this many vectors, dequantize the layer and use torch's GEMM (prefill)
GEMM_F16_MIN_VECTORS = 16  # same for fp16 GEMMs (7B: 16 tokens 1.6 s either way; 32: 1.7 s vs 5.1 in the kernels)
GEMM_SLICE_VALUES = 1 << 23  # fp32 weights dequantized at a time for the GEMM (32 MB) at most
GEMM_ROWS = 1024  # rows per slice where they fit: 4096-wide ones stay in L3 between dequantization and GEMM
GEMM_F16_ROWS = 256  # rows of fp16 weights at a time: 2-7 MB, still in cache when the GEMM reads them
GEMM_INT16_ROWS = 512  # rows of 16-bit integer planes at a time (int16 GEMMs)
# above this many vectors the int16 GEMM beats the kernels (one 14336x4096 layer, 2 threads, AMX Xeon): its
# planes cost ~20 ms a layer whatever the batch, the K-quants' eight-row kernels are the fastest per vector
GEMM_INT16_MIN_VECTORS = {"Q4_0": 16, "Q4_1": 16, "Q8_0": 16, "Q4_K": 64, "Q5_K": 48, "Q6_K": 24}
# the same for the kernels' own int16 GEMM (AVX512-VNNI without AMX: int16_by_kernel), measured on one
# 14336x4096 layer on a 2-core Xeon: it unpacks the layer once per call (~15 ms), the 32-wide kinds' batches
# otherwise go to fp32 passes, the K-quants' to their integer kernels
GEMM_KERNEL_MIN_VECTORS = {"Q4_0": 8, "Q4_1": 8, "Q8_0": 8, "Q4_K": 24, "Q5_K": 24, "Q6_K": 24}
# GALE_GEMM's choices (gemm_dtype); torch.int16 stands for 16-bit integer planes through int8 GEMMs
GEMM_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int16": torch.int16}
PREFETCH_BYTES = 16384  # the kernels' software prefetch distance where it helps (prefetch_bytes)
KINDS = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")  # kernels.c's GALE_Q4_0 .. GALE_Q6_K


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, or GALE_NO_KERNELS=1): callers then keep fp32 weights."""
    if os.environ.get("GALE_NO_KERNELS") == "1":
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    flags = build_flags()
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)
                         + " ".join([cc, *flags, platform.machine(), _cpu_name()]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gale"
    lib = cache / f"gemv-{key.hexdigest()[:16]}.so"
    if not lib.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                out = Path(tmp) / "gemv.so"
                subprocess.run([cc, *flags, *map(str, SOURCES), "-o", str(out)], check=True, capture_output=True,
                               timeout=120)
                os.replace(out, lib)  # atomic: concurrent first uses never load a half-written file
        except (OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", b"") or b""
            print(f"gale: cannot compile the quantized kernels ({e}; {err.decode(errors='replace')[-300:]}); "
                  "weights will be dequantized to fp32", file=sys.stderr)
            return None
    dll = ctypes.CDLL(str(lib))  # torch has loaded libgomp already: the kernels share its OpenMP threads
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    dll.gale_gemv.argtypes = [p, p, p, i64, i32, i32]
    dll.gale_dequant.argtypes = [p, p, i64, p, i32]
    dll.gale_dequant_f16.argtypes = [p, i64, i64, p, i32]
    dll.gale_dequant_planes.argtypes = [p, i64, i64, p, p, i32]
    dll.gale_planes.argtypes = [p, i64, i64, p, p, i32]
    dll.gale_decode.argtypes = [p, p, p, p, i32, i64, i64, i64, p, p, p, p, p, i32]
    dll.gale_gemm_int.argtypes = [p, p, p, i64, i32]
    dll.gale_gemm_int.restype = i32
    dll.gale_gemm_int_ok.restype = i32
    dll.gale_kv_half.restype = i32
    return dll


def build_flags() -> list[str]:
    """The compiler flags of the kernels' library: optimized for this CPU, OpenMP, the prefetch distance."""
    native = "-march=native" if platform.machine().lower() in ("x86_64", "amd64") else "-mcpu=native"
    return ["-O3", native, "-fopenmp", "-shared", "-fPIC", f"-DGALE_PREFETCH={prefetch_bytes()}"]


class _QMat(ctypes.Structure):
    """kernels.c's gale_qmat: one matrix of GGUF block records."""
    _fields_ = [("kind", ctypes.c_int64), ("blocks", ctypes.c_void_p), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64)]


# A transformer block's projections, in kernels.c's gale_layer order.
PROJECTIONS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
               "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


class _Layer(ctypes.Structure):
    """kernels.c's gale_layer."""
    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
                *((name.rpartition(".")[2], _QMat) for name in PROJECTIONS)]


class _Dims(ctypes.Structure):
    """kernels.c's gale_dims."""
    _fields_ = [(name, ctypes.c_int64) for name in ("n_layers", "dim", "hidden", "n_heads", "n_kv_heads", "head_dim")] \
        + [("eps", ctypes.c_double)]


@functools.cache  # asked by the cache key and by prefetch_bytes: read /proc/cpuinfo (large on big servers) once
def _cpu_name() -> str:
    """The CPU's model name and feature flags (part of the library's cache key: -march=native code built on one
    machine must not run on another whose name is the same and whose features are not, e.g. "AMD EPYC" VMs on
    Zen 3 and Zen 5)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags")]
    return "\n".join(wanted) if any(wanted) else platform.processor()


def prefetch_bytes() -> int:
    """How far ahead (bytes) the kernels prefetch the weights they stream one row at a time: GALE_PREFETCH if set
    (0: no prefetch at all), else PREFETCH_BYTES on CPUs with AVX-512 and on AMD's, none elsewhere; the kernels
    that read rows side by side (eight or sixteen; Q6_K's pairs) prefetch their next group of rows instead
    whenever it is not 0 (kernels.c's prefetch_next_group: on Zen 4 a 7B decode step 1.21-1.38x). Measured
    (benchmarks/NOTES.md): on Zen 5 (AVX-512) a 7B decode step ran 1.3x faster with it, the 14336-wide FFN
    matrices 1.9x; on Zen 3 (AVX2 only) the same prefetches made decode 10-20% slower in session 7, and 7B
    decode 1.17x (Q4_0) / 1.10x (Q4_K_M) faster with session 19's kernels (Intel CPUs without AVX-512: not
    measured, so none there). On a 2-core AMX Xeon VM 7B decode ran 1.6x faster with it (8-64 KB alike). On
    Zen 4, one 7B GEMV from DRAM: none 0.74-1.01x, 4 KB 0.66-0.88x, 32-64 KB 0.98-1.06x of 16 KB (before the
    eight-row kernels prefetched their next rows)."""
    if "GALE_PREFETCH" in os.environ:
        return int(os.environ["GALE_PREFETCH"])
    cpu = _cpu_name()
    return PREFETCH_BYTES if " avx512f" in cpu or "AMD" in cpu.split("\n")[0] else 0


@functools.cache
def gemm_dtype() -> torch.dtype:
    """What prefill's GEMMs multiply in: GALE_GEMM (fp32, fp16 or int16) if set, else fp16 on CPUs with AMX's
    fp16 tiles, int16 on other AMX CPUs (int8 tiles) and on AVX512-VNNI ones, fp32 elsewhere.

    fp16 rounds the weights, the activations and each product's sum to 11 significant bits; the sums are fp32
    inside the GEMM. int16 has two implementations (int16_by_kernel). On AMX it holds each weight row and each
    token's activations to 16-bit integers of their largest value (2^-16 of it), split into two signed byte
    planes that meet in torch's int8 GEMM (`torch._int_mm`, exact int32 sums; see QuantLinear._gemm_int16).
    Without AMX the kernels' gale_gemm_int multiplies the weights' own integers by the activations held to 16
    bits per group as decoding does (2^-16 of each group of 32 or 256): the one-vector path's numbers, ten
    times closer to fp32 than the planes on the gate below. Everything outside the projections stays
    fp32 (residual stream, norms, attention, decode's integer path), and so do scoring's GEMMs
    (`exact_gemms`); a product that cannot be held (non-finite inputs, or fp16's 65504) is recomputed in fp32.
    Measured (benchmarks/NOTES.md): on a 2-core AMX Xeon with AMX-FP16, torch's fp16 and bf16 GEMMs (oneDNN)
    ran 1.4-2.1 TFLOPS against fp32's 0.24-0.33; fp16 was chosen over bf16 for its 3 more bits (top-1
    agreement with the fp32 path on real text 99.2% vs 96.5%). On one without AMX-FP16 (fp16 GEMMs there run
    at fp32's speed), torch's int8 GEMM ran 2.3-2.5 TOPS: int16's three byte products per multiply-add 1.8-2.5x
    fp32. On a 2-core Xeon without AMX (AVX512-VNNI), gale_gemm_int ran ~2x torch's fp32 GEMM (vpdpwssd: 32
    multiply-adds an instruction against an FMA's 16). The gates: tests/test_quant.py."""
    choice = os.environ.get("GALE_GEMM")
    if choice is None:
        amx_fp16 = getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
        return torch.float16 if amx_fp16() else torch.int16 if _amx_int8() or _vnni_gemm() else torch.float32
    if choice not in GEMM_DTYPES:
        raise ValueError(f"GALE_GEMM={choice!r} is not one of {sorted(GEMM_DTYPES)}")
    if choice == "int16" and not (hasattr(torch, "_int_mm") or _vnni_gemm()):
        raise ValueError(f"GALE_GEMM=int16 needs AVX512-VNNI or torch._int_mm, which torch {torch.__version__} lacks")
    return GEMM_DTYPES[choice]


def _amx_int8() -> bool:
    """AMX's int8 tiles through torch's int8 GEMM (a private API: absent, this path is not chosen)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return bool(amx()) and hasattr(torch, "_int_mm")


@functools.cache
def _vnni_gemm() -> bool:
    """Whether the kernels' own int16 GEMM (gale_gemm_int: AVX512-VNNI builds) is there."""
    lib = kernels()
    return lib is not None and bool(lib.gale_gemm_int_ok())


def int16_by_kernel() -> bool:
    """Whether int16 GEMMs run in the kernels' gale_gemm_int rather than torch's int8 GEMM over 16-bit planes:
    yes on AVX512-VNNI CPUs without AMX (AMX's tiles ran 2 TOPS, the kernel ~0.14 T multiply-adds), and
    wherever torch lacks `_int_mm`."""
    return _vnni_gemm() and not _amx_int8()


_EXACT = contextvars.ContextVar("gale_exact_gemms", default=False)


@contextlib.contextmanager
def exact_gemms() -> Iterator[None]:
    """Prefill GEMMs in fp32 inside the block, whatever gemm_dtype() says (this thread and context only: an
    engine stepping in another thread keeps its own). Scoring uses it, so log-likelihoods (evaluation, the
    server's echo) stay those of the dequantized model, which evaluation compares with reference harnesses."""
    token = _EXACT.set(True)
    try:
        yield
    finally:
        _EXACT.reset(token)


def _gemm_dtype_here() -> torch.dtype:
    return torch.float32 if _EXACT.get() else gemm_dtype()


_SCRATCH = threading.local()


def _scratch(rows: int, cols: int) -> torch.Tensor:
    """This thread's fp32 buffer for `rows` dequantized rows of `cols`, reused by every GEMM slice: a fresh
    tensor per slice was page-faulted in each time (2048 rows of a 7B layer: 17 ms of dequantization against
    53 of GEMM). One 7B prefill GEMM on Zen 3, 512 tokens: 101 -> 124-163 GFLOPS (benchmarks/NOTES.md)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < rows * cols:
        buf = _SCRATCH.buf = torch.empty(rows * cols)
    return buf[:rows * cols].view(rows, cols)


class QuantLinear(nn.Module):
    """`y = x W^T` with W in GGUF's block records (any of KINDS), read in place.

    Inference only (no gradient). `from_gguf` takes a tensor's raw blocks, rows = output features; a view of
    a memory-mapped file stays one (the weights are the file's pages: no copy, nothing to load).
    """

    def __init__(self, kind: str, blocks: np.ndarray, in_features: int, out_features: int) -> None:
        super().__init__()
        self.kind, self.in_features, self.out_features = kind, in_features, out_features
        # A plain attribute, not a buffer: CPU-only, never saved, and module attribute lookups cost
        # microseconds that add up over 200 calls per decoded token.
        self.blocks = blocks
        self._lib = kernels()
        self.mat = _QMat(KINDS.index(kind), blocks.ctypes.data, out_features, in_features)
        self._mat = ctypes.addressof(self.mat)

    @classmethod
    def from_gguf(cls, kind: str, raw: np.ndarray, out_features: int, in_features: int) -> QuantLinear:
        if kind not in KINDS or kernels() is None:
            raise ValueError(f"no kernel for {kind} blocks (or no C compiler to build it)")
        width, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
        if in_features % width:
            raise ValueError(f"in_features={in_features} is not a multiple of {kind}'s {width}-wide blocks")
        size = block_bytes * (in_features // width)
        if raw.size != out_features * size:
            raise ValueError(f"{kind} blocks of {raw.size} bytes for a {out_features}x{in_features} weight "
                             f"(expected {out_features * size})")
        return cls(kind, np.ascontiguousarray(raw, dtype=np.uint8).reshape(out_features, size), in_features,
                   out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous():
            return self(x.reshape(-1, self.in_features).float().contiguous()).reshape(*x.shape[:-1], -1)
        if x.requires_grad:
            return torch.nn.functional.linear(x, self.dequantized())
        dtype = _gemm_dtype_here()
        least = GEMM_MIN_VECTORS
        if dtype == torch.int16:
            least = (GEMM_KERNEL_MIN_VECTORS if int16_by_kernel() else GEMM_INT16_MIN_VECTORS)[self.kind]
        elif dtype == torch.float16:
            least = GEMM_F16_MIN_VECTORS
        if x.shape[0] > least:
            return self._gemm(x, dtype)
        y = torch.empty(x.shape[0], self.out_features)
        self._lib.gale_gemv(self._mat, x.data_ptr(), y.data_ptr(), x.shape[0], 1, torch.get_num_threads())
        return y

    def _gemm(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x W^T by torch's GEMM in `dtype`, W dequantized a slice of rows at a time: a 14336x4096 layer holds
        32 MB of fp32 at once instead of 235 MB (what a 7B prefill's peak RSS carried)."""
        if dtype == torch.float16:
            return self._gemm_f16(x)
        if dtype == torch.int16:
            return self._gemm_kernel(x) if int16_by_kernel() else self._gemm_int16(x)
        rows = max(1, min(GEMM_ROWS, GEMM_SLICE_VALUES // self.in_features, self.out_features))
        w, index = _scratch(rows, self.in_features), torch.arange(self.out_features)
        yt = torch.empty(self.out_features, x.shape[0])
        for r0 in range(0, self.out_features, rows):
            n = min(rows, self.out_features - r0)
            self._lib.gale_dequant(self._mat, index[r0:].data_ptr(), n, w.data_ptr(), torch.get_num_threads())
            torch.mm(w[:n], x.T, out=yt[r0:r0 + n])
        return yt.T.contiguous()

    def _gemm_f16(self, x: torch.Tensor) -> torch.Tensor:
        """The fp16 GEMM over slices of GEMM_F16_ROWS rows, each multiplied while it is still in cache. Measured
        on a 7B prefill of 512 tokens (benchmarks/NOTES.md): 78.8 tok/s against 65 with 2048-row slices (whose
        fp16 rows went to DRAM and back) and 52.6 with 512-row ones (oneDNN's fp16 GEMM is slow on that width)."""
        xh = x.to(torch.float16)
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float16)
        for r0 in range(0, self.out_features, GEMM_F16_ROWS):
            n = min(GEMM_F16_ROWS, self.out_features - r0)
            y[:, r0:r0 + n] = torch.mm(xh, self.dequantized_f16(r0, n).T)
        # one fp32 sum tells whether any fp16 product overflowed (or x held NaN): isfinite().all() cost 10x more
        if not bool(y.sum(dtype=torch.float32).isfinite()):
            return self._gemm(x, torch.float32)  # beyond fp16's range: as the fp32 path computes
        return y.float()

    def _gemm_int16(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T with both held to 16-bit integers (W per row, x per token, a = 256 h + l: kernels.c's
        gale_dequant_planes and gale_planes) through torch's int8 GEMM: x W^T = sx sw (65536 hx.hw + 256 (lx.hw
        + hx.lw) + lx.lw), the middle two as one GEMM over [lx | hx] . [hw | lw] (twice the width), lx.lw
        (below 2^-16 of the rest) left out: three byte products per multiply-add, exact int32 sums. Slices of
        GEMM_INT16_ROWS rows (4-14 MB of planes). Non-finite inputs go to the fp32 GEMM."""
        k = self.in_features
        ax, sx = torch.empty(x.shape[0], 2 * k, dtype=torch.int8), torch.empty(x.shape[0])
        self._lib.gale_planes(x.data_ptr(), x.shape[0], k, ax.data_ptr(), sx.data_ptr(), torch.get_num_threads())
        if not bool(sx.isfinite().all()):
            return self._gemm(x, torch.float32)
        y = torch.empty(x.shape[0], self.out_features)
        sx = sx[:, None] * 256
        for r0 in range(0, self.out_features, GEMM_INT16_ROWS):
            n = min(GEMM_INT16_ROWS, self.out_features - r0)
            w, sw = self.dequantized_planes(r0, n)
            if not bool(sw.isfinite().all()):
                return self._gemm(x, torch.float32)
            t = torch._int_mm(ax[:, k:], w[:, :k].T).float().mul_(256).add_(torch._int_mm(ax, w.T))
            torch.mul(t.mul_(sx), sw, out=y[:, r0:r0 + n])
        return y

    def _gemm_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T by the kernels' own int16 GEMM (kernels.c's gale_gemm_int: the weights' own integers, x held to
        16 bits per group as decoding holds it). x holding inf or NaN goes to the fp32 GEMM."""
        y = torch.empty(x.shape[0], self.out_features)
        if self._lib.gale_gemm_int(self._mat, x.data_ptr(), y.data_ptr(), x.shape[0], torch.get_num_threads()):
            return self._gemm(x, torch.float32)
        return y

    def dequantized_planes(self, r0: int = 0, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows r0 .. r0 + n of W as 16-bit integers of each row's largest value: ([n, 2 in] int8 = [h | l],
        [n] scale) with W ~ scale (256 h + l) to scale / 2 (kernels.c's gale_dequant_planes); a row holding
        inf or NaN has scale NaN."""
        n = self._rows_in_range(r0, n)
        w = torch.empty(n, 2 * self.in_features, dtype=torch.int8)
        scale = torch.empty(n)
        self._lib.gale_dequant_planes(self._mat, r0, n, w.data_ptr(), scale.data_ptr(), torch.get_num_threads())
        return w, scale

    def _rows_in_range(self, r0: int, n: int | None) -> int:
        """n (default: the rows from r0 on), or IndexError where rows r0 .. r0 + n are not W's."""
        n = self.out_features - r0 if n is None else n
        if not (0 <= r0 and n >= 0 and r0 + n <= self.out_features):
            raise IndexError(f"rows {r0}..{r0 + n} out of range for {self.out_features} rows")
        return n

    def dequantized_f16(self, r0: int = 0, n: int | None = None) -> torch.Tensor:
        """fp16 rows r0 .. r0 + n of W (all by default): dequantized().half(), bit for bit."""
        n = self._rows_in_range(r0, n)
        w = torch.empty(n, self.in_features, dtype=torch.float16)
        self._lib.gale_dequant_f16(self._mat, r0, n, w.data_ptr(), torch.get_num_threads())
        return w

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight `[out, in]` (exactly the values the loaders' dequantization gives)."""
        w = torch.empty(self.out_features, self.in_features)
        self._lib.gale_dequant(self._mat, None, self.out_features, w.data_ptr(), torch.get_num_threads())
        return w

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """fp32 rows `index` of W: an embedding lookup over the same blocks as the tied output projection."""
        flat = index.reshape(-1).to(torch.int64).contiguous()
        if flat.numel() and not 0 <= int(flat.min()) <= int(flat.max()) < self.out_features:
            raise IndexError(f"row index out of range for {self.out_features} rows")
        w = torch.empty(flat.numel(), self.in_features)
        self._lib.gale_dequant(self._mat, flat.data_ptr(), flat.numel(), w.data_ptr(), torch.get_num_threads())
        return w.reshape(*index.shape, self.in_features)

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}"


class QuantEmbedding(nn.Module):
    """Token embeddings read from the blocks of a tied output projection: no fp32 copy of the vocabulary."""

    def __init__(self, table: QuantLinear) -> None:
        super().__init__()
        self.table = (table,)  # not a submodule: the output projection owns it

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[0].rows(tokens)


class DecodeKernel:
    """Every layer of a decode step and the final norm in one C call (kernels.c's `gale_decode`), for a model
    whose projections are all QuantLinear: one Python call per token instead of ~40 torch ops per layer.

    The loader installs it as `Transformer.decode_kernel`; model.py's Attention and FeedForward stay the
    reference (prefill, GPU, training), and tests hold the two to the same logits and greedy tokens.
    """

    def __init__(self, model: nn.Module) -> None:
        a = model.args
        self._lib = kernels()
        self._dims = _Dims(a.n_layers, a.dim, a.hidden_dim, a.n_heads, a.n_kv_heads, a.head_dim, a.norm_eps)
        self._layers = (_Layer * a.n_layers)()
        # K/V storage it reads: fp32, and fp16 where the build has F16C (AVX2 builds); arithmetic stays fp32
        self.cache_dtypes = (torch.float32, torch.float16) if self._lib.gale_kv_half() else (torch.float32,)
        self._head_dim, self._theta = a.head_dim, a.rope_theta
        self._rot = torch.empty(0)  # model.rope_rotations of positions 0.. as (cos, sin) pairs, grown on demand
        self._pointers: tuple = ()  # (cache.k, cache.v, their ctypes arrays): rebuilt when the cache grows
        self._norms = [model.norm.weight.detach().float().contiguous()]  # owners of the pointers handed to C
        for spec, block in zip(self._layers, model.layers):
            self._norms += [block.attention_norm.weight.detach().float().contiguous(),
                            block.ffn_norm.weight.detach().float().contiguous()]
            spec.attn_norm, spec.ffn_norm = self._norms[-2].data_ptr(), self._norms[-1].data_ptr()
            for name in PROJECTIONS:
                setattr(spec, name.rpartition(".")[2], block.get_submodule(name).mat)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return kernels() is not None and all(
            isinstance(block.get_submodule(name), QuantLinear) for block in model.layers for name in PROJECTIONS)

    def __call__(self, h: torch.Tensor, meta, cache) -> torch.Tensor | None:  # noqa: ANN001
        """Final-norm hidden states after `meta`'s decode step, or None where this path does not apply (a cache
        not on the CPU or not in `cache_dtypes`): the caller then runs the layers itself."""
        if cache is None or cache.dtype not in self.cache_dtypes or cache.device.type != "cpu":
            return None
        h = h.float().clone(memory_format=torch.contiguous_format)
        slots = meta.slots
        slots = torch.arange(slots.start, slots.stop) if isinstance(slots, slice) else slots.to(torch.int64)
        positions = meta.positions.to(torch.int64).contiguous()
        self._lib.gale_decode(ctypes.addressof(self._dims), self._layers, *self._cache_pointers(cache),
                              int(cache.dtype == torch.float16),
                              cache.allocated, cache.capacity, h.shape[0], slots.contiguous().data_ptr(),
                              positions.data_ptr(), self._rotations(int(positions.max())).data_ptr(),
                              self._norms[0].data_ptr(), h.data_ptr(), torch.get_num_threads())
        return h

    def _rotations(self, last: int) -> torch.Tensor:
        """The table of rotations up to position `last`: the very values model.py's layers apply."""
        if last >= self._rot.shape[0]:
            n = max(1024, 1 << last.bit_length())
            self._rot = torch.view_as_real(rope_rotations(torch.arange(n), self._head_dim, self._theta)).contiguous()
        return self._rot

    def _cache_pointers(self, cache) -> tuple:  # noqa: ANN001
        if not self._pointers or self._pointers[0] is not cache.k or self._pointers[1] is not cache.v:
            arrays = [(ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts]) for ts in (cache.k, cache.v)]
            self._pointers = (cache.k, cache.v, *arrays)
        return self._pointers[2:]
