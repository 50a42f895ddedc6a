"""Linear layers over GGUF blocks: exactly the dequantized weights, products equal to fp32 ones."""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from gale.cache import RollingCache
from gale.config import ModelArgs
from gale.model import Transformer
from gale.quant import (
    GEMM_MIN_VECTORS,
    GEMV_MAX_VECTORS,
    PROJECTIONS,
    DecodeKernel,
    QuantEmbedding,
    QuantLinear,
    kernels,
)

pytestmark = pytest.mark.skipif(kernels() is None, reason="no C compiler for the kernels")


def layer(kind: str, out_features: int = 96, in_features: int = 160, seed: int = 0):
    w = np.random.default_rng(seed).standard_normal((out_features, in_features)).astype(np.float32)
    raw = quantize(w, GGMLQuantizationType[kind])
    return QuantLinear.from_gguf(kind, raw, out_features, in_features), torch.from_numpy(
        dequantize(raw, GGMLQuantizationType[kind]).reshape(out_features, in_features).copy())


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_dequantize_exactly_as_gguf(kind):
    q, w = layer(kind)
    assert torch.equal(q.dequantized(), w)
    index = torch.tensor([[3, 7, 3], [95, 0, 41]])
    assert torch.equal(QuantEmbedding(q)(index), w[index])  # lookups read the same blocks


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("n", [1, 2, 3, GEMV_MAX_VECTORS, GEMV_MAX_VECTORS + 1, 40, GEMM_MIN_VECTORS + 1])
def test_products_equal_fp32_ones(kind, n):
    q, w = layer(kind, seed=n)
    x = torch.randn(n, w.shape[1])
    ref = x.double() @ w.double().T
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == (n, w.shape[0])
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_single_vectors_keep_fp32_accuracy_over_wide_ranges(kind):
    """One vector takes the int16-split path: values spanning 12 decades in a block, a zero block and a block
    below 1e-30 must still give fp32-accurate products."""
    q, w = layer(kind, in_features=192)
    x = torch.randn(1, 192) * torch.logspace(-8, 4, 192)[torch.randperm(192)]
    x[0, 32:64] = 0
    x[0, 64:96] = 1e-35
    ref = x.double() @ w.double().T
    bound = x.double().abs() @ w.double().abs().T  # error scale of any fp32 summation order
    assert (q(x).double() - ref).abs().le(1e-6 * bound).all()


def test_any_leading_shape_and_layouts():
    q, w = layer("Q4_1")
    x = torch.randn(2, 3, w.shape[1])
    torch.testing.assert_close(q(x), x @ w.T, rtol=1e-5, atol=1e-4)
    xt = torch.randn(w.shape[1], 5).T  # not contiguous
    torch.testing.assert_close(q(xt), xt @ w.T, rtol=1e-5, atol=1e-4)
    assert q(torch.randn(1, 4, w.shape[1], dtype=torch.bfloat16)).dtype == torch.float32


def test_bad_blocks_are_refused():
    with pytest.raises(ValueError, match="no kernel"):
        QuantLinear.from_gguf("Q5_K", np.zeros((4, 176), np.uint8), 4, 256)
    with pytest.raises(ValueError, match="multiple of the 32"):
        QuantLinear.from_gguf("Q8_0", np.zeros((4, 34), np.uint8), 4, 40)
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


def test_without_a_compiler_models_load_dequantized(smollm2_path):
    code = ("import gale, gale.quant as q; llm = gale.load(progress=False); "
            "assert not any(isinstance(m, q.QuantLinear) for m in llm.model.modules()); "
            "print(llm.generate('The capital of France is', max_tokens=3).text)")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "GALE_NO_KERNELS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


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
            raw = quantize(weight.numpy(), GGMLQuantizationType[kind])
            setattr(block.get_submodule(parent), attr, QuantLinear.from_gguf(kind, raw, *weight.shape))
    assert DecodeKernel.supports(q)
    q.decode_kernel = DecodeKernel(q)
    return q


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "window"), [(4, 2, 16, 5), (8, 2, 12, 3), (4, 4, 16, None)])
def test_one_call_decode_equals_the_models_layers(kind, heads, kv_heads, head_dim, window):
    """gale_decode against model.py's Attention/FeedForward on the same blocks: sequences of different lengths
    in non-contiguous slots, decoding far past tiny windows (the rolling buffer wraps many times)."""
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, head_dim=head_dim, hidden_dim=96, n_heads=heads, n_kv_heads=kv_heads,
                     vocab_size=50, sliding_window=window, max_seq_len=64)
    fast = quantized(Transformer(args).eval(), kind)
    for p in fast.parameters():  # norms away from 1, so a wrong norm weight shows
        p.data.uniform_(0.5, 1.5)
    slow = copy.copy(fast)
    slow.decode_kernel = None
    caches = [RollingCache(args, 6), RollingCache(args, 6)]
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
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
            tokens = ref.argmax(-1).repeat(2)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # the kernel wrote the same keys and values


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
