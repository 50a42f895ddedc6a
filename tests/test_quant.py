"""Linear layers over GGUF blocks: exactly the dequantized weights, products equal to fp32 ones."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from gale.quant import GEMM_MIN_VECTORS, GEMV_MAX_VECTORS, QuantEmbedding, QuantLinear, kernels

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
