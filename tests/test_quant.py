"""Linear layers over GGUF blocks: exactly the dequantized weights, products equal to fp32 ones (the integer path:
within 2^-16 of each activation group's largest value), the one-call decode equal to the model's layers."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from gale import quant
from gale.cache import RollingCache
from gale.config import ModelArgs
from gale.model import Transformer
from gale.quant import (
    GEMM_F16_MIN_VECTORS,
    GEMM_INT16_MIN_VECTORS,
    GEMM_KERNEL_MIN_VECTORS,
    GEMM_MIN_VECTORS,
    GEMV_MAX_VECTORS,
    KINDS,
    PROJECTIONS,
    DecodeKernel,
    QuantEmbedding,
    QuantLinear,
    build_flags,
    exact_gemms,
    gemm_dtype,
    kernels,
)
from gale.quantize import quantize as quantize_blocks

pytestmark = pytest.mark.skipif(kernels() is None, reason="no C compiler for the kernels")


K_KINDS = ["Q4_K", "Q5_K", "Q6_K"]


def blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """GGUF records of a random weight: gguf's quantizer for the 32-wide kinds; for the K-quants (which gguf
    cannot quantize) random bytes with fp16 scales that keep weights near unit size."""
    qtype = GGMLQuantizationType[kind]
    rng = np.random.default_rng(seed)
    if kind not in K_KINDS:
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    width, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // width, size), dtype=np.uint8)
    scales = (rng.uniform(0.5, 1.5, (rows, cols // width, 2)) / (200 * cols**0.5)).astype(np.float16).view(np.uint8)
    if kind == "Q6_K":
        raw[..., -2:] = scales[..., :2]  # d is the last field
    else:
        raw[..., :4] = scales  # d, dmin come first
    return raw.reshape(rows, -1)


def layer(kind: str, out_features: int = 96, in_features: int = 512, seed: int = 0):
    raw = blocks(kind, out_features, in_features, seed)
    return QuantLinear.from_gguf(kind, raw, out_features, in_features), torch.from_numpy(
        dequantize(raw, GGMLQuantizationType[kind]).reshape(out_features, in_features).copy())


def single_vector_bound(x: torch.Tensor, w: torch.Tensor, kind: str) -> torch.Tensor:
    """What the integer path (one vector; the K-quants' batches up to 64) guarantees: each activation is held to
    16 bits of its group's largest value (error <= max / 65278 each: a = round(x / s) with s = max / 32639), so
    |error| <= sum_groups max|x_g| sum_(j in g) |w_j| / 65278, plus fp32 summation noise."""
    group = GGML_QUANT_SIZES[GGMLQuantizationType[kind]][0]
    top = x.double().abs().reshape(x.shape[0], -1, group).amax(-1)  # [n, groups]
    wsum = w.double().abs().reshape(w.shape[0], -1, group).sum(-1)  # [rows, groups]
    return top @ wsum.T / 65278 * 1.001 + 1e-6 * (x.double().abs() @ w.double().abs().T)


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_dequantize_exactly_as_gguf(kind):
    q, w = layer(kind)
    assert torch.equal(q.dequantized(), w)
    index = torch.tensor([[3, 7, 3], [95, 0, 41]])
    assert torch.equal(QuantEmbedding(q)(index), w[index])  # lookups read the same blocks


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, GEMV_MAX_VECTORS, GEMV_MAX_VECTORS + 1, 40, GEMM_MIN_VECTORS,
                               GEMM_MIN_VECTORS + 1])
def test_products_equal_fp32_ones(kind, n):
    q, w = layer(kind, seed=n)
    x = torch.randn(n, w.shape[1])
    ref = x.double() @ w.double().T
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == (n, w.shape[0])
    if n == 1 or (kind in K_KINDS and n <= GEMM_MIN_VECTORS):  # integer products with 16-bit activations
        assert (got.double() - ref).abs().le(single_vector_bound(x, w, kind)).all()
        assert (got.double() - ref).abs().max() > 0  # it is that path (fp32 sums would be closer still)
    else:
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 4])
def test_integer_sums_hold_at_the_largest_weights_and_activations(kind, n):
    """Every quantized value and scale at its largest, every activation equal (all at 32639 after the group's
    scaling): the int32 sums of the integer path must not wrap (kernels.c's bounds)."""
    width, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    raw = np.full((8, 1024 // width, size), 0xFF, np.uint8)
    half = np.array([1.0], np.float16).view(np.uint8)  # d (and dmin / m) = 1
    if kind == "Q6_K":
        raw[..., 192:208] = 0x7F  # int8 scales 127
        raw[..., 208:] = half
    elif kind in K_KINDS:
        raw[..., 0:2] = raw[..., 2:4] = half
    else:
        raw[..., 0:2] = half
        if kind == "Q4_1":
            raw[..., 2:4] = half
        if kind == "Q8_0":
            raw[..., 2:] = 0x7F  # int8 127
    raw = raw.reshape(8, -1)
    q = QuantLinear.from_gguf(kind, raw, 8, 1024)
    w = torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).reshape(8, 1024).copy())
    x = torch.full((n, 1024), 0.75)
    torch.testing.assert_close(q(x).double(), x.double() @ w.double().T, rtol=1e-6, atol=0)


def integer_products(lin: QuantLinear, x: torch.Tensor, dll=None) -> torch.Tensor:
    """x W^T through the decode step's products: the integer path at any batch size (gale_gemv's fp32_batches
    = 0), by this build's library or `dll`."""
    import ctypes

    y = torch.empty(x.shape[0], lin.out_features)
    (dll or lin._lib).gale_gemv(ctypes.byref(lin.mat), x.data_ptr(), y.data_ptr(), x.shape[0], 0, 1)
    return y


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [96, 60])
def test_decode_batches_take_the_integer_path_vector_by_vector(kind, rows):
    """The decode step's batches (eight rows at a time for up to four vectors per pass: Q4_0 / Q4_1, and Q8_0 /
    Q4_K / Q5_K with VNNI; Q4_0 / Q4_1 sixteen at a time from three vectors with AVX512-VNNI; 60 rows: one row at
    a time) hold the single-vector bound, and each vector's products do not
    depend on its batch: bit for bit, the same integer sums and fp32 operations (Q6_K: up to fp32 rounding)."""
    q, w = layer(kind, out_features=rows, seed=rows)
    x = torch.randn(9, w.shape[1]) * torch.logspace(-2, 2, w.shape[1])
    alone = torch.cat([integer_products(q, x[i:i + 1]) for i in range(9)])
    for n in (2, 3, 4, 5, 9):
        got = integer_products(q, x[:n])
        assert (got.double() - x[:n].double() @ w.double().T).abs().le(single_vector_bound(x[:n], w, kind)).all()
        if kind == "Q6_K":  # its fp32 sums take more chains for fewer vectors (row_dot_q6k's C)
            torch.testing.assert_close(got, alone[:n], rtol=1e-5, atol=1e-6 * got.abs().max().item())
        else:
            assert torch.equal(got, alone[:n])


@pytest.mark.parametrize("cols", [8192, 14336])
def test_wide_q6k_rows_taken_in_pairs_are_the_single_rows_products(cols):
    """From 8192 columns (kernels.c's Q6K_PAIR_COLS) one vector meets Q6_K's rows two at a time (rows_q6k, R =
    2): the single-vector bound holds, and each row's product is the one-row kernel's (an odd row count keeps
    every row single) up to fp32 rounding (fewer FMA chains per row)."""
    q, w = layer("Q6_K", out_features=64, in_features=cols, seed=cols)
    single = QuantLinear.from_gguf("Q6_K", blocks("Q6_K", 64, cols, seed=cols)[:63], 63, cols)
    x = torch.randn(1, cols) * torch.logspace(-2, 2, cols)
    got = integer_products(q, x)
    assert (got.double() - x.double() @ w.double().T).abs().le(single_vector_bound(x, w, "Q6_K")).all()
    torch.testing.assert_close(got[:, :63], integer_products(single, x), rtol=1e-5, atol=1e-6 * got.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_single_vectors_hold_each_groups_largest_value_to_16_bits(kind):
    """Values spanning 12 decades, a zero group and a group below 1e-30 (zeros then, not garbage): errors stay
    within 2^-16 of each group's largest value, whatever the spread inside it."""
    q, w = layer(kind, in_features=1024)
    x = torch.randn(1, 1024) * torch.logspace(-8, 4, 1024)[torch.randperm(1024)]
    x[0, 256:512] = 0
    x[0, 512:768] = 1e-35
    ref = x.double() @ w.double().T
    assert (q(x).double() - ref).abs().le(single_vector_bound(x, w, kind)).all()


def test_any_leading_shape_and_layouts():
    q, w = layer("Q4_1")
    x = torch.randn(2, 3, w.shape[1])
    torch.testing.assert_close(q(x), x @ w.T, rtol=1e-5, atol=1e-4)
    xt = torch.randn(w.shape[1], 5).T  # not contiguous
    torch.testing.assert_close(q(xt), xt @ w.T, rtol=1e-5, atol=1e-4)
    assert q(torch.randn(1, 4, w.shape[1], dtype=torch.bfloat16)).dtype == torch.float32


def test_bad_blocks_are_refused():
    with pytest.raises(ValueError, match="no kernel"):
        QuantLinear.from_gguf("Q5_0", np.zeros((4, 22), np.uint8), 4, 32)
    with pytest.raises(ValueError, match="multiple of Q8_0's 32-wide"):
        QuantLinear.from_gguf("Q8_0", np.zeros((4, 34), np.uint8), 4, 40)
    with pytest.raises(ValueError, match="multiple of Q4_K's 256-wide"):
        QuantLinear.from_gguf("Q4_K", np.zeros((4, 144), np.uint8), 4, 128)
    with pytest.raises(ValueError, match="expected 80"):  # Q4_0-sized records (18 bytes) for a Q4_1 tensor
        QuantLinear.from_gguf("Q4_1", np.zeros((4, 18), np.uint8), 4, 32)


def test_default_model_keeps_its_blocks_and_its_logits(smollm2_path, smollm2_llm):
    from gale.weights import load_model

    kinds = [m.kind for m in smollm2_llm.model.modules() if isinstance(m, QuantLinear)]
    assert len(kinds) == 30 * 7 + 1 and kinds.count("Q8_0") == 1  # every projection + the tied output (Q8_0)
    assert isinstance(smollm2_llm.model.tok_embeddings, QuantEmbedding)  # no fp32 copy of the vocabulary
    plain = load_model(smollm2_path, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    tokens = torch.tensor(smollm2_llm.tokenizer.encode("The capital of France is Paris, and the capital of"))
    last = tokens[-1:].repeat(3)  # decode-sized batches take the kernel, the prompt takes the GEMM
    for x in (tokens, last):  # logits span about +-30; sums in another order through 30 layers differ by ~1e-4
        with torch.inference_mode():
            got, ref = smollm2_llm.model(x), plain(x)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-3)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


PASSAGE = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
           "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally "
           "nicknamed \"La dame de fer\", it was constructed as the centrepiece of the 1889 World's Fair, and to crown "
           "the centennial anniversary of the French Revolution. Although initially criticised by some of France's "
           "leading artists and intellectuals for its design, it has since become a global cultural icon of France and "
           "one of the most recognisable structures in the world.")


def test_quality_gate_single_vector_integer_path_on_real_text(smollm2_path, smollm2_llm):
    """The quality gate of the 16-bit-activation integer path (every decode step takes it): on a real passage,
    token by token through the one-call decode, against the dequantized fp32 model. Measured: perplexity 7.32600
    vs 7.32603 (3.0e-6 relative), top-1 agreement 100%, largest logit difference 0.0076 (logits span +-30);
    the same kernels with 12-bit activations: 5e-4, 99.2%, 0.15; with llama.cpp's 8 bits: 3.3e-3, 98.5%, 1.58
    (and "L'Étoile, la Marseillaise, ..." for the capital of France). Gate: perplexity within 0.1%, top-1
    agreement >= 99%, logits within 0.05."""
    from gale.weights import load_model

    ids = torch.tensor(smollm2_llm.tokenizer.encode(PASSAGE))
    model = smollm2_llm.model
    assert isinstance(model.decode_kernel, DecodeKernel)
    cache = RollingCache(model.args, 1)
    with torch.inference_mode():
        fast = torch.cat([model(t.view(1), cache.prepare([0], [1]), cache) for t in ids])
        ref = load_model(smollm2_path, progress=False)(ids)
    nll = [torch.nn.functional.cross_entropy(x[:-1], ids[1:]).item() for x in (fast, ref)]
    assert abs(nll[0] - nll[1]) < 1e-3  # perplexity within 0.1%
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.99
    assert (fast - ref).abs().max() < 0.05


def gemm_in(monkeypatch, name: str):
    """Prefill GEMMs in `name` (the suite pins fp32: conftest.py)."""
    monkeypatch.setenv("GALE_GEMM", name)
    gemm_dtype.cache_clear()
    yield
    gemm_dtype.cache_clear()


@pytest.fixture
def fp16_gemm(monkeypatch):
    """fp16 prefill GEMMs, AMX-FP16 CPUs' default."""
    yield from gemm_in(monkeypatch, "fp16")


def int16_by(monkeypatch, how: str) -> None:
    """int16 GEMMs through `how`: "planes" (torch's int8 GEMM over 16-bit planes, AMX CPUs' default) or
    "kernel" (the kernels' gale_gemm_int, the default of AVX512-VNNI CPUs without AMX); skips where this
    machine has not got it."""
    if how == "kernel" and not quant._vnni_gemm():
        pytest.skip("the kernels' int16 GEMM needs AVX512-VNNI")
    if how == "planes" and not hasattr(torch, "_int_mm"):
        pytest.skip("this torch has no int8 GEMM (torch._int_mm)")
    monkeypatch.setattr(quant, "int16_by_kernel", lambda: how == "kernel")


@pytest.fixture(params=["planes", "kernel"])
def int16_gemm(request, monkeypatch):
    """Prefill's int16 GEMMs, each implementation in turn (int16_by)."""
    int16_by(monkeypatch, request.param)
    yield from gemm_in(monkeypatch, "int16")


@pytest.fixture(params=["fp16", "int16-planes", "int16-kernel"])
def fast_gemm(request, monkeypatch):
    """Each faster-than-fp32 prefill GEMM in turn: the quality gates hold for all."""
    name, _, how = request.param.partition("-")
    if how:
        int16_by(monkeypatch, how)
    yield from gemm_in(monkeypatch, name)


def test_gemm_dtype_is_chosen_or_refused(monkeypatch):
    monkeypatch.setenv("GALE_GEMM", "bf16")
    gemm_dtype.cache_clear()
    with pytest.raises(ValueError, match="GALE_GEMM='bf16' is not one of"):
        gemm_dtype()
    monkeypatch.delenv("GALE_GEMM")
    gemm_dtype.cache_clear()
    amx_fp16, amx = torch.cpu._is_amx_fp16_supported(), torch.cpu._is_amx_tile_supported()
    vnni = quant._vnni_gemm()
    assert gemm_dtype() == (torch.float16 if amx_fp16 else torch.int16 if amx or vnni else torch.float32)
    assert quant.int16_by_kernel() == (vnni and not amx)
    gemm_dtype.cache_clear()
    monkeypatch.delattr(torch, "_int_mm")  # a torch without the int8 GEMM: int16 only through the kernel
    assert (gemm_dtype() == torch.int16) == (vnni and not amx_fp16)
    assert quant.int16_by_kernel() == vnni
    monkeypatch.setenv("GALE_GEMM", "int16")
    gemm_dtype.cache_clear()
    if vnni:
        assert gemm_dtype() == torch.int16
    else:
        with pytest.raises(ValueError, match="needs AVX512-VNNI or torch._int_mm"):
            gemm_dtype()
    gemm_dtype.cache_clear()


@pytest.mark.parametrize("kind", KINDS)
def test_fp16_rows_are_the_dequantized_ones_rounded(kind):
    q, w = layer(kind, 40, 1024)
    assert torch.equal(q.dequantized_f16(), w.half())
    assert torch.equal(q.dequantized_f16(5, 7), w[5:12].half())
    assert q.dequantized_f16(40, 0).shape == (0, 1024)
    for r0, n in ((-1, 2), (39, 2), (0, -1)):
        with pytest.raises(IndexError, match="out of range"):
            q.dequantized_f16(r0, n)


def extreme_blocks(kind: str) -> np.ndarray:
    """Records whose scales span fp16's range, its largest finite values and subnormals: their fp16 rows hold
    infinities, values that round up to infinity, subnormals and zeros."""
    raw = blocks(kind, 16, 256, seed=3)
    size, at = GGML_QUANT_SIZES[GGMLQuantizationType[kind]][1], 208 if kind == "Q6_K" else 0
    scales = np.array([65504, 30000, 2049, 1, 2**-14, 2**-20, 1e-7, 0.1], np.float16)
    records = raw.reshape(16, -1, size)
    pick = np.add.outer(np.arange(16), np.arange(records.shape[1])) % len(scales)
    records[..., at:at + 2] = scales[pick].view(np.uint8).reshape(*pick.shape, 2)
    return raw


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vector", [True, False])
def test_fp16_rows_round_as_torch_at_the_range_ends(kind, vector, tmp_path):
    """The AVX-512 rows (this build, where the CPU has them) and the portable ones (a build without AVX-512):
    the same bits as torch's rounding of the fp32 rows, infinities and subnormals included."""
    import ctypes

    from gale.quant import _QMat

    raw = extreme_blocks(kind)
    w = torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).reshape(16, 256).copy())
    if vector:
        got = QuantLinear.from_gguf(kind, raw, 16, 256).dequantized_f16()
    else:
        dll = variant_library(tmp_path, "-mno-avx512f")
        dll.gale_dequant_f16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                         ctypes.c_int]
        got = torch.empty(16, 256, dtype=torch.float16)
        mat = _QMat(KINDS.index(kind), raw.ctypes.data, 16, 256)
        dll.gale_dequant_f16(ctypes.byref(mat), 0, 16, got.data_ptr(), 1)
    ref = w.half()
    assert ref.isinf().any() and (ref != 0).any()
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


def variant_library(tmp_path: Path, *flags: str):
    """The kernels built with extra compiler flags (say, without an instruction set this CPU has)."""
    import ctypes

    from gale.quant import SOURCES

    lib = tmp_path / "variant.so"
    subprocess.run(["cc", *build_flags(), *flags, *map(str, SOURCES), "-o", str(lib)], check=True,
                   capture_output=True, timeout=120)
    return ctypes.CDLL(str(lib))


def fp16_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What an fp16 GEMM with fp32 sums guarantees: x and w each rounded to 11 bits (<= 2^-11 relative each),
    the sum rounded once to fp16 (<= 2^-11 of it), plus fp32 summation noise."""
    mag = x.double().abs() @ w.double().abs().T
    return mag * (2 * 2**-11 + 2**-22) + (x.double() @ w.double().T).abs() * 2**-11 * 1.001


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [GEMM_F16_MIN_VECTORS + 1, GEMM_MIN_VECTORS + 1])
def test_fp16_gemm_products_hold_fp16s_bound(kind, n, fp16_gemm):
    q, w = layer(kind, 300, 1024)
    x = torch.randn(n, 1024)
    ref = x.double() @ w.double().T
    err = (q(x).double() - ref).abs()
    assert err.le(fp16_bound(x, w)).all()
    assert err.max() > 1e-5 * ref.abs().max()  # it is that path (the fp32 one is ~100x closer)


def test_fp16_gemm_recomputes_what_fp16_cannot_hold_in_fp32(fp16_gemm):
    q, w = layer("Q4_0", 300, 1024)
    x = torch.randn(GEMM_MIN_VECTORS + 1, 1024)
    x[7, 3] = 1e6  # beyond fp16's 65504: the fp16 input is infinite, the fp32 product is not
    got, ref = q(x), x.double() @ w.double().T
    assert got.isfinite().all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


HALF_STEP = 0.5 + 32639 * 2**-22  # half a step, plus fp32's rounding of v times 1 / scale (~0.004 of a step)


def check_planes(v: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> None:
    """hi, lo [n, k] int8 and scale [n] hold each row of v as 16-bit integers of its largest value: a = 256 hi +
    lo within half a step of v / scale, scale = max |v| / 32639, hi in [-127, 127]."""
    top = v.abs().amax(1)
    torch.testing.assert_close(scale, torch.where(top >= 1e-30, top / 32639, 0.0), rtol=1e-6, atol=0)
    a = hi.int() * 256 + lo.int()
    assert a.abs().max() <= 32639 and hi.abs().max() <= 127
    assert ((a.double() * scale[:, None].double() - v.double()).abs()
            <= scale[:, None].double() * HALF_STEP).all()


@pytest.mark.parametrize("kind", KINDS)
def test_int16_planes_hold_each_rows_largest_value_to_16_bits(kind):
    """Weight rows (gale_dequant_planes: [h | l]) and activation rows (gale_planes: [l | h]) as 16-bit integers
    of their largest value in two byte planes: within half a step (2^-16 of the largest) of the fp32 values; a
    zero row zeros, a row holding inf or NaN a NaN scale."""
    import ctypes

    q, w = layer(kind, 40, 1024)
    pw, sw = q.dequantized_planes()
    check_planes(w, pw[:, :1024], pw[:, 1024:], sw)
    assert torch.equal(q.dequantized_planes(5, 7)[0], pw[5:12])
    with pytest.raises(IndexError, match="out of range"):
        q.dequantized_planes(39, 2)
    x = torch.randn(5, 1000) * torch.logspace(-3, 3, 1000)  # 1000: the vector loop's scalar end too
    x[1] = 0
    x[2, 7], x[3, 9], x[4, 999] = float("inf"), float("nan"), float("nan")
    px, sx = torch.empty(5, 2000, dtype=torch.int8), torch.empty(5)
    q._lib.gale_planes(ctypes.c_void_p(x.data_ptr()), 5, 1000, ctypes.c_void_p(px.data_ptr()),
                       ctypes.c_void_p(sx.data_ptr()), 1)
    check_planes(x[:2], px[:2, 1000:], px[:2, :1000], sx[:2])
    assert not px[1:].any() and sx[1] == 0 and sx[2:].isnan().all()  # zero and non-finite rows: zeros


def test_int16_planes_of_portable_builds_are_this_builds(tmp_path):
    """Without AVX-512 the planes come from scalar loops (rintf, ties to even, as vcvtps2dq): the same bytes."""
    import ctypes

    from gale.quant import _QMat

    dll = variant_library(tmp_path, "-mno-avx512f")
    dll.gale_dequant_planes.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_int]
    for kind in KINDS:
        raw = blocks(kind, 24, 512, seed=5)
        pw, sw = QuantLinear.from_gguf(kind, raw, 24, 512).dequantized_planes()
        got, scale = torch.empty(24, 1024, dtype=torch.int8), torch.empty(24)
        mat = _QMat(KINDS.index(kind), raw.ctypes.data, 24, 512)
        dll.gale_dequant_planes(ctypes.byref(mat), 0, 24, got.data_ptr(), scale.data_ptr(), 1)
        assert torch.equal(got, pw) and torch.equal(scale, sw)


def int16_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the int16 GEMM guarantees: x and w within half a step of their rows' 16-bit integers (HALF_STEP sx,
    HALF_STEP sw per element), the low planes' product left out (|lx . lw| <= k 128^2 sx sw), int32 sums
    exact, then a few fp32 roundings."""
    k = x.shape[1]
    ax, aw = x.double().abs(), w.double().abs()
    sx, sw = ax.amax(1, keepdim=True) / 32639, aw.amax(1, keepdim=True) / 32639
    ex, ew = sx * HALF_STEP, sw * HALF_STEP
    rounding = ax.sum(1, keepdim=True) @ ew.T + ex @ aw.sum(1, keepdim=True).T + k * ex @ ew.T
    return rounding + k * 128**2 * sx @ sw.T + 1e-6 * (ax @ aw.T)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("more", [1, 40])
def test_int16_gemm_products_hold_its_bound(kind, more, int16_gemm):
    n = max(GEMM_INT16_MIN_VECTORS[kind], GEMM_KERNEL_MIN_VECTORS[kind]) + more  # fewer take the kernels
    q, w = layer(kind, 300, 1024)
    x = torch.randn(n, 1024) * torch.logspace(-2, 2, 1024)
    ref = x.double() @ w.double().T
    err = (q(x).double() - ref).abs()
    # the kernel holds x to 16 bits per group and W to its own integers: the integer path's tighter bound
    assert err.le(single_vector_bound(x, w, kind) if quant.int16_by_kernel() else int16_bound(x, w)).all()
    assert err.max() > 1e-6 * ref.abs().max()  # it is that path (the fp32 one is closer)


def test_builds_without_avx512_vnni_refuse_the_kernel_gemm(tmp_path):
    """The kernels' int16 GEMM exists only where vpdpwssd does: elsewhere it says so (quant._vnni_gemm is then
    False and int16 GEMMs take torch's int8 GEMM, or are refused) and writes nothing."""
    import ctypes

    dll = variant_library(tmp_path, "-mno-avx512vnni", "-mno-avxvnni")
    dll.gale_gemm_int.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    q, _ = layer("Q4_0", 32, 256)
    x, y = torch.randn(3, 256), torch.full((3, 32), 7.0)
    assert dll.gale_gemm_int_ok() == 0
    assert dll.gale_gemm_int(q._mat, x.data_ptr(), y.data_ptr(), 3, 1) == -1
    assert y.eq(7.0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_int16_kernel_gemm_is_the_integer_path(kind):
    """gale_gemm_int computes the one-vector kernels' integer sums (the same 16-bit activations, the weights'
    own integers) for any number of vectors: within fp32 summation order of gale_gemv's integer path, for
    panels of 32 rows cut short (5, 77 rows), every tile of 6 vectors cut short (n mod 6) and more vectors
    than one pass over the panels takes (512)."""
    if not quant._vnni_gemm():
        pytest.skip("the kernels' int16 GEMM needs AVX512-VNNI")
    for rows, n in ((5, 7), (77, 1), (77, 2), (77, 3), (77, 4), (77, 5), (77, 6), (77, 13), (40, 65), (40, 515)):
        q, w = layer(kind, rows, 1024, seed=rows + n)
        x = torch.randn(n, 1024) * torch.logspace(-2, 2, 1024)
        got, one = torch.full((n, rows), float("nan")), torch.empty(n, rows)
        assert q._lib.gale_gemm_int(q._mat, x.data_ptr(), got.data_ptr(), n, 2) == 0
        q._lib.gale_gemv(q._mat, x.data_ptr(), one.data_ptr(), n, 0, 2)  # the integer path at any batch
        ref = x.double() @ w.double().T
        assert (got.double() - ref).abs().le(single_vector_bound(x, w, kind)).all()
        torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-5 * float(one.abs().max()))
        x[n // 2, 100] = float("nan")
        assert q._lib.gale_gemm_int(q._mat, x.data_ptr(), got.data_ptr(), n, 2) == 1  # refused: fp32's to do


def test_int16_gemm_recomputes_non_finite_inputs_in_fp32(int16_gemm):
    q, w = layer("Q4_0", 300, 1024)
    x = torch.randn(GEMM_MIN_VECTORS + 1, 1024)
    x[7, 3] = float("inf")
    got = q(x)
    with exact_gemms():
        ref = q(x)
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num())


BICYCLE = (Path(__file__).parent / "data" / "text" / "bicycle.txt").read_text()


def test_quality_gate_fast_prefill_gemms_on_real_text(smollm2_path, smollm2_llm, fast_gemm):
    """The quality gate of prefill's fp16 GEMM (AMX-FP16 CPUs' default) and its int16 one (other AMX CPUs'): two
    real passages (132 and 600 tokens) prefilled in one pass each, against the dequantized fp32 model. Measured
    on a 2-core AMX Xeon: fp16 perplexity -0.036% and +0.024%, top-1 agreement 100% and 99.5%, largest logit
    differences 0.142 and 0.090 (logits span +-30); int16 (another AMX Xeon, without AMX-FP16) -0.033% and
    +0.010%, 100% and 99.67%, 0.067 and 0.077. bf16 GEMMs, as fast there, gave 96.5% top-1 agreement and 0.90
    on a 1024-token text, mostly from rounding each product's sum to 8 bits. Gate: perplexity within 0.1%, top-1
    agreement >= 99%, logits within 0.2."""
    from gale.weights import load_model

    plain = load_model(smollm2_path, progress=False)
    for text in (PASSAGE, BICYCLE):
        ids = torch.tensor(smollm2_llm.tokenizer.encode(text))
        assert len(ids) > GEMM_MIN_VECTORS
        with torch.inference_mode():
            fast, ref = smollm2_llm.model(ids), plain(ids)
        nll = [torch.nn.functional.cross_entropy(x[:-1], ids[1:]).item() for x in (fast, ref)]
        assert abs(nll[0] - nll[1]) < 1e-3  # perplexity within 0.1%
        assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.99
        assert (fast - ref).abs().max() < 0.2


def test_scoring_keeps_fp32_gemms_where_prefill_takes_fp16(smollm2_llm, monkeypatch):
    """Log-likelihoods (evaluation, echo) are the dequantized model's whatever GALE_GEMM says, and only inside
    scoring: the same model prefills in fp16 outside it."""
    from gale.quant import exact_gemms
    from gale.scoring import sequence_logprobs

    ids = smollm2_llm.tokenizer.encode(PASSAGE)
    scores = {}
    for dtype in ("fp32", "fp16"):
        monkeypatch.setenv("GALE_GEMM", dtype)
        gemm_dtype.cache_clear()
        scores[dtype] = sequence_logprobs(smollm2_llm.model, ids)
    x = torch.tensor(ids)
    with torch.inference_mode():
        fast = smollm2_llm.model(x)
        with exact_gemms():
            exact = smollm2_llm.model(x)
    gemm_dtype.cache_clear()
    assert scores["fp16"] == scores["fp32"]
    assert not torch.equal(fast, exact)  # outside scoring, the fp16 GEMM


def test_fast_prefill_gemms_keep_the_default_models_answers(smollm2_path, monkeypatch):
    """A question behind a long system prompt (its prefill takes the GEMM): the same greedy tokens in fp16 and
    int16 (both implementations where this machine has them) as in fp32, and the answer is still Paris. No
    prefix cache: each prompt is computed."""
    import gale

    llm = gale.load(smollm2_path, progress=False, prefix_cache_tokens=0)
    system = "You are a helpful assistant. " + BICYCLE[:600] + " Answer the user's question in one sentence."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is the capital of France?"}]
    answers = {}
    here = {"planes": hasattr(torch, "_int_mm"), "kernel": quant._vnni_gemm()}
    ways = [("fp32", None), ("fp16", None)] + [("int16", how) for how, ok in here.items() if ok]
    for dtype, how in ways:
        monkeypatch.setenv("GALE_GEMM", dtype)
        monkeypatch.setattr(quant, "int16_by_kernel", lambda how=how: how == "kernel")
        gemm_dtype.cache_clear()
        answers[dtype, how] = llm.chat(messages, max_tokens=16, temperature=0.0).text
    gemm_dtype.cache_clear()
    assert len(set(answers.values())) == 1, answers
    assert "Paris" in answers["fp32", None]


def test_without_a_compiler_models_load_dequantized(smollm2_path):
    code = ("import gale, gale.quant as q; llm = gale.load(progress=False); "
            "assert not any(isinstance(m, q.QuantLinear) for m in llm.model.modules()); "
            "print(llm.generate('The capital of France is', max_tokens=3).text)")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "GALE_NO_KERNELS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_prefetching_builds_give_the_same_products():
    """GALE_PREFETCH picks the weights' prefetch distance at build time (per CPU by default); it moves memory
    traffic only, so every kind's products are bit-for-bit those of a build without it."""
    code = ("import sys, torch, numpy as np; sys.path.insert(0, sys.argv[2]); from test_quant import layer; "
            "from gale.quant import KINDS, prefetch_bytes; torch.manual_seed(0); out = []\n"
            "for kind in KINDS:\n"
            "    lin, _ = layer(kind, 300, 1024)\n"
            "    out += [lin(torch.randn(n, 1024)).numpy() for n in (1, 4, 9)]\n"
            "np.save(sys.argv[1], np.concatenate([o.ravel() for o in out])); print(prefetch_bytes())")
    results = {}
    for distance in ("0", "2048"):
        path = f"{os.environ.get('TMPDIR', '/tmp')}/gale-prefetch-{os.getpid()}-{distance}.npy"
        r = subprocess.run([sys.executable, "-c", code, path, os.path.dirname(__file__)],
                           env={**os.environ, "GALE_PREFETCH": distance},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == distance
        results[distance] = np.load(path)
        os.remove(path)
    assert np.array_equal(results["0"], results["2048"])


def _beyond_avx2() -> bool:
    """Whether this CPU has instructions an AVX2-only build leaves out (AVX-512, AVX-VNNI)."""
    from gale.quant import _cpu_name

    return bool({"avx512f", "avx_vnni"} & set(_cpu_name().split()))


@pytest.mark.skipif(not _beyond_avx2(), reason="this CPU's build is the AVX2-only one")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [64, 60])
def test_avx2_builds_give_this_builds_products(kind, rows, tmp_path):
    """Eight Q4_0 rows at a time meet byte planes of the activations through VNNI's vpdpbusd, or through two
    AVX2 instructions without it, and gather their scales (vpmovdw, or a byte shuffle): an AVX2-only build must
    give the same products up to fp32 rounding, both within the integer path's bound of the fp32 product (60
    rows: the last four one at a time), QuantLinear's and the decode step's batches alike."""
    import ctypes

    dll = variant_library(tmp_path, "-mno-avx512f", "-mno-avxvnni")
    dll.gale_gemv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    raw = blocks(kind, rows, 1024, seed=3)
    lin = QuantLinear.from_gguf(kind, raw, rows, 1024)
    w = torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).reshape(rows, 1024).copy())
    for n in (1, 4, 9):
        x = torch.randn(n, 1024) * torch.logspace(-2, 2, 1024)
        avx2 = torch.empty(n, rows)
        dll.gale_gemv(ctypes.byref(lin.mat), x.data_ptr(), avx2.data_ptr(), n, 1, 1)
        this = lin(x)
        pairs = [(this, avx2), (integer_products(lin, x), integer_products(lin, x, dll))]  # QuantLinear's, decode's
        for i, (a, b) in enumerate(pairs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float((x.abs() @ w.abs().T).max()))
            if n == 1 or kind in K_KINDS or i == 1:
                for got in (a, b):
                    assert (got.double() - x.double() @ w.double().T).abs().le(single_vector_bound(x, w, kind)).all()


@pytest.mark.parametrize("slow_gather", ["0", "1"])
def test_eight_row_kernels_read_scales_alike_with_or_without_gathers(slow_gather, tmp_path):
    """The eight-row kernels read their rows' scales by a vector gather, or (GALE_SLOW_GATHER: AMD's cores) by
    eight scalar loads (dwords, or Q4_0 / Q8_0's 16-bit d alone: rows8_d_ps): the same values, so the decode
    step's products are bit for bit the same either way."""
    import ctypes

    dll = variant_library(tmp_path, f"-DGALE_SLOW_GATHER={slow_gather}")
    dll.gale_gemv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    for kind in KINDS:
        lin, _ = layer(kind, 64, 1024, seed=5)
        x = torch.randn(4, 1024)
        for n in (1, 4):
            assert torch.equal(integer_products(lin, x[:n]), integer_products(lin, x[:n], dll))


def test_library_key_names_the_cpus_features():
    """The cache key holds the CPU's flags, not only its name: VMs named "AMD EPYC" run on Zen 3 (AVX2) and Zen 5
    (AVX-512), and -march=native code from one would crash on the other."""
    from gale.quant import _cpu_name

    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    name = _cpu_name()
    assert "flags" in name and "model name" in name


def test_lora_on_quantized_layers_says_how_to_load(smollm2_llm):
    from gale.lora import LoraConfig, apply_lora

    with pytest.raises(ValueError, match=r"quantized=False"):
        apply_lora(smollm2_llm.model, LoraConfig(rank=2, alpha=4, dropout=0.0, targets=("wq",)))


def quantized(model: Transformer, kind: str) -> Transformer:
    """A copy of `model` with every projection in `kind` blocks and the one-call decode installed."""
    q = copy.deepcopy(model)
    for block in q.layers:
        for name in PROJECTIONS:
            parent, _, attr = name.rpartition(".")
            weight = block.get_submodule(name).weight.detach()
            raw = quantize_blocks(weight, kind)  # llama.cpp's quantizers (gale's C ports)
            setattr(block.get_submodule(parent), attr, QuantLinear.from_gguf(kind, raw, *weight.shape))
    assert DecodeKernel.supports(q)
    q.decode_kernel = DecodeKernel(q)
    return q


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "window"), [(4, 2, 16, 5), (8, 2, 12, 3), (4, 4, 16, None)])
def test_one_call_decode_equals_the_models_layers(kind, heads, kv_heads, head_dim, window):
    """gale_decode against model.py's Attention/FeedForward on the same blocks: sequences of different lengths
    in non-contiguous slots, decoding far past tiny windows (the rolling buffer wraps many times). K-quant
    layers need every width in 256s."""
    check_one_call_decode(kind, heads, kv_heads, head_dim, window, torch.float32)


@pytest.mark.parametrize("kind", ["Q4_0", "Q6_K"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "window"), [(4, 2, 16, 5), (8, 2, 12, 3)])
def test_one_call_decode_reads_fp16_caches_as_the_model_does(kind, heads, kv_heads, head_dim, window):
    """An fp16 K/V cache (half the memory): the kernel rounds what it writes as torch's .to(float16) does and
    reads it in fp32, as model.py's layers do (head_dim 12 takes the scalar ends of the conversions)."""
    assert torch.float16 in quantized(Transformer(ModelArgs(dim=64, n_layers=1, head_dim=16, hidden_dim=64,
                                                            n_heads=4, n_kv_heads=2, vocab_size=20)).eval(),
                                      "Q8_0").decode_kernel.cache_dtypes
    check_one_call_decode(kind, heads, kv_heads, head_dim, window, torch.float16)


def check_one_call_decode(kind: str, heads: int, kv_heads: int, head_dim: int, window: int | None,
                          kv_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    dim, hidden = (256, 512) if kind in K_KINDS else (64, 96)
    head_dim = 256 // heads if kind in K_KINDS else head_dim
    # the one-call decode takes the 16-bit integer path at any batch size, and so do the layers' K-quant batches
    # (the 32-wide kinds' are fp32 there); the C and torch norms' slightly different fp32 outputs round apart
    # now and then
    tolerance = 1e-3
    args = ModelArgs(dim=dim, n_layers=2, head_dim=head_dim, hidden_dim=hidden, n_heads=heads, n_kv_heads=kv_heads,
                     vocab_size=50, sliding_window=window, max_seq_len=64)
    fast = quantized(Transformer(args).eval(), kind)
    for p in fast.parameters():  # norms away from 1, so a wrong norm weight shows
        p.data.uniform_(0.5, 1.5)
    slow = copy.copy(fast)
    slow.decode_kernel = None
    caches = [RollingCache(args, 6, dtype=kv_dtype, compute_dtype=torch.float32) for _ in range(2)]
    slots, prompts = [5, 0, 3], [7, 1, 12]
    g = torch.Generator().manual_seed(1)
    prompt, tokens = torch.randint(0, 50, (sum(prompts),), generator=g), torch.randint(0, 50, (3,), generator=g)
    with torch.inference_mode():
        for model, cache in zip((fast, slow), caches):
            model(prompt, cache.prepare(slots, prompts), cache)
        for step in range(40):
            active = slots if step % 5 else slots[::2]  # some steps leave a sequence out
            toks = tokens[: len(active)]
            metas = [c.prepare(active, [1] * len(active)) for c in caches]
            got, ref = (m(toks, meta, c) for m, meta, c in zip((fast, slow), metas, caches))
            torch.testing.assert_close(got, ref, rtol=0, atol=tolerance * ref.abs().max().item())
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
            tokens = ref.argmax(-1).repeat(2)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        # the kernel wrote the same keys and values (the K-quant models' run to ~50)
        # (an fp16 cache: one ulp, 2^-10 of the largest, where near-equal inputs round to neighbours)
        step = tolerance / 10 if kv_dtype == torch.float32 else 2**-10
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=step * max(1.0, b.abs().max().item()))


def dequantize_into(plain: Transformer, model: Transformer) -> Transformer:
    """`plain` (the model `model` was quantized from) given `model`'s dequantized weights: the fp32 model a GGUF
    loads as without the kernels."""
    for mine, theirs in zip(plain.layers, model.layers):
        for name in PROJECTIONS:
            mine.get_submodule(name).weight.data = theirs.get_submodule(name).dequantized()
    return plain


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_logits_equal_the_dequantized_models(kind):
    """Every kind, every path (a 65-token prefill: GEMM; decode batches of 1, 3, 9 and 65 sequences: the integer
    and fp32 paths and the one-call decode) through window wraps: logits within 1e-3 of the largest of the
    dequantized fp32 model's, same greedy tokens wherever the top two differ by more than twice that."""
    torch.manual_seed(0)
    wide = 256 if kind in K_KINDS else 64
    args = ModelArgs(dim=wide, n_layers=2, head_dim=wide // 4, hidden_dim=2 * wide, n_heads=4, n_kv_heads=2,
                     vocab_size=64, sliding_window=4, max_seq_len=128)
    base = Transformer(args).eval()
    fast = quantized(base, kind)
    slow = dequantize_into(base, fast)
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for batch in (1, 3, 9, 65):
            caches = [RollingCache(args, batch), RollingCache(args, batch)]
            prompt = torch.randint(0, 64, (batch * 6,), generator=g)
            tokens = torch.randint(0, 64, (batch,), generator=g)
            for step in range(8):  # a 6-token prompt each, then decode past the window of 4
                metas = [c.prepare(list(range(batch)), [6] * batch if step == 0 else [1] * batch) for c in caches]
                x = prompt if step == 0 else tokens
                got, ref = (m(x, meta, c) for m, meta, c in zip((fast, slow), metas, caches))
                atol = 1e-3 * ref.abs().max().item()
                torch.testing.assert_close(got, ref, rtol=0, atol=atol)
                top2 = ref.topk(2, dim=-1).values
                clear = top2[..., 0] - top2[..., 1] > 2 * atol  # greedy picks not decided by the tolerance itself
                assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
                tokens = ref.reshape(batch, -1, 64)[:, -1].argmax(-1)


def test_one_call_decode_declines_a_cache_it_cannot_read():
    args = ModelArgs(dim=64, n_layers=1, head_dim=16, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=20,
                     sliding_window=4, max_seq_len=32)
    model = quantized(Transformer(args).eval(), "Q8_0")
    cache = RollingCache(args, 1, dtype=torch.bfloat16)
    with torch.inference_mode():
        model(torch.tensor([1, 2, 3]), cache.prepare([0], [3]), cache)
        meta = cache.prepare([0], [1])
        assert model.decode_kernel(torch.zeros(1, 64), meta, cache) is None  # the model runs its layers


def test_one_call_decode_rotates_by_the_models_own_table():
    from gale.model import rope_rotations

    args = ModelArgs(dim=64, n_layers=1, head_dim=16, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=20,
                     rope_theta=1e6)
    kernel = quantized(Transformer(args).eval(), "Q8_0").decode_kernel
    small = kernel._rotations(5)
    grown = kernel._rotations(small.shape[0] + 3000)  # grows past its first size
    ref = torch.view_as_real(rope_rotations(torch.arange(grown.shape[0]), 16, 1e6))
    assert grown.shape[0] > small.shape[0] + 3000 and torch.equal(grown, ref)


def test_default_model_decodes_the_same_tokens_in_one_call(smollm2_llm):
    model, engine = smollm2_llm.model, smollm2_llm.engine
    assert isinstance(model.decode_kernel, DecodeKernel)
    prompt = smollm2_llm.tokenizer.encode("The capital of France is Paris, and the capital of Germany is")
    from gale.sampling import SamplingParams

    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    fast = engine.generate([prompt], [params])[0].token_ids
    kernel, model.decode_kernel = model.decode_kernel, None
    try:
        slow = engine.generate([prompt], [params])[0].token_ids
    finally:
        model.decode_kernel = kernel
    assert fast == slow
