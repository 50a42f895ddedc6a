"""benchmarks/gpu.py on the CPU with its tiny model: the GPU run's code paths, so the one GPU run cannot fail on a
typo, and its logits check shown to pass on the same weights and to fail on a RoPE-layout bug."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from gale.weights.hf import to_hf

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


TINY_RUN = ["--device", "cpu", "--tiny", "--compile-backend", "eager"]  # eager: dynamo traces, nothing is built


def test_tiny_run_has_every_section_and_matches_hf(gpu, tmp_path):
    gpu.main([*TINY_RUN, "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu.json").read_text())
    sections = report["sections"]
    assert list(sections) == list(gpu.SECTIONS)
    assert all(e["ok"] for e in sections.values()), {n: e.get("error") for n, e in sections.items()}
    logits = sections["logits"]["result"]
    assert logits["passed"] and logits["logits_passed"] and logits["greedy_passed"], logits
    assert logits["positions"] == 56 + 8 - 1 and logits["greedy_tokens"] == 8
    assert {"gale_max_err_prompt_beyond_window", "gale_max_err_decode"} <= set(logits)  # the buffer rolled
    assert sections["decode"]["result"]["fraction_of_roofline_measured"] > 0
    assert set(sections["throughput"]["result"]) >= {"b2", "b4"}
    prefill = sections["prefill"]["result"]
    assert prefill["full"]["kv_cache_gb"] > prefill["swa"]["kv_cache_gb"] and prefill["last_logits_max_diff"] > 0
    compiled = sections["compile"]["result"]
    assert compiled["identical_ids"] == compiled["tokens"] and compiled["max_logit_diff"] == 0
    a = gpu.TINY  # HF holds Gale's tensors; only q and k are copies (permuted rows)
    assert report["meta"]["hf_own_gb"] * 1e9 == a.n_layers * 2 * (a.n_heads + a.n_kv_heads) * a.head_dim * a.dim
    md = (tmp_path / "gpu.md").read_text()
    assert "| logits within tolerance" in md and "logits and greedy check passed: True" in md


def test_hf_names_and_rope_rows_are_gale_weights_hf(gpu):
    args = gpu.TINY
    model = gpu.build_model(args, torch.device("cpu"), torch.bfloat16, seed=0)
    for name, t in model.state_dict().items():
        ours, theirs = gpu.to_hf(name, t, args), to_hf(name, t, args)
        assert ours[0] == theirs[0] and torch.equal(ours[1], theirs[1]), name


def test_logits_check_fails_on_a_rope_layout_bug(gpu, tmp_path, monkeypatch):
    right = gpu.to_hf
    monkeypatch.setattr(gpu, "to_hf", lambda name, t, args: (right(name, t, args)[0], t))  # q/k rows not permuted
    report = gpu.main([*TINY_RUN, "--out", str(tmp_path), "--sections", "logits"])
    logits = report["sections"]["logits"]["result"]
    assert not logits["logits_passed"] and not logits["passed"]
    assert logits["gale_max_err"] > 3 * logits["tolerance"]
