"""Quantizers against references (gguf's numpy quantizers, gguf's dequantizer, llama.cpp itself when installed),
llama.cpp's per-tensor type rules, quantize-on-load == `gale quantize` + load, and their errors."""

import errno
import importlib.util
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from test_weights import random_state
from test_weights import write_gguf as write_reference_gguf

from gale import cli
from gale.config import ModelArgs
from gale.quant import KINDS, QuantEmbedding, QuantLinear
from gale.quantize import FORMATS, QuantizeError, quantize, scheme_name, tensor_type
from gale.tokenizer import load_tokenizer
from gale.weights import CheckpointError, load_model, open_checkpoint, save_hf, save_mistral, write_gguf
from gale.weights.quantized import planned_types

pytestmark = pytest.mark.usefixtures("one_thread")
Q = gguf.GGMLQuantizationType
MISTRAL_V1 = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data/tokenizer.model.v1"
# Rows of 256 so the K-quants apply; Mistral's 32000-token SentencePiece vocabulary so llama.cpp can load it.
ARGS = ModelArgs(dim=256, n_layers=2, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2, vocab_size=32000,
                 sliding_window=16, max_seq_len=128)
TOKENS = torch.tensor([1, 415, 3340, 302, 272, 8354, 13580, 349, 264, 1628, 28705, 5, 9, 200, 3000, 31000])


def weights(rows: int = 64, cols: int = 1024, seed: int = 0) -> torch.Tensor:
    """Gaussian rows plus the edge cases: a zero row, a constant row, a row of tiny values, one outlier."""
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    x[1], x[2], x[3] = 0.0, 0.7, x[3] * 1e-6
    x[4, 7] = 40.0
    return x


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_32_wide_types_are_gguf_reference_blocks_bit_for_bit(kind):
    x = weights()
    assert np.array_equal(quantize(x, kind), gguf_quantize(x.numpy(), Q[kind]))


# Relative RMS error of gguf's dequantization of our blocks on Gaussian weights (measured: 0.070, 0.035, 0.017;
# Q4_0 gives 0.084 on the same rows): the layouts are right (a misplaced nibble or scale gives ~1) and the
# least-squares scale search pays (a plain max-abs Q4 scale gives ~0.10).
K_BOUNDS = {"Q4_K": 0.075, "Q5_K": 0.038, "Q6_K": 0.019}


@pytest.mark.parametrize("kind", sorted(K_BOUNDS))
def test_k_quants_dequantize_close_to_their_input(kind):
    x = weights()
    blocks = quantize(x, kind)
    assert blocks.shape == (64, 1024 // 256 * FORMATS[kind][2])
    back = torch.from_numpy(gguf_dequantize(blocks, Q[kind])).reshape(x.shape)
    gaussian = [0, *range(5, 64)]
    err = (back - x)[gaussian].pow(2).mean().sqrt() / x[gaussian].pow(2).mean().sqrt()
    assert err < K_BOUNDS[kind]
    assert torch.equal(back[1], torch.zeros(1024))  # zeros stay exact
    assert (back[2] - 0.7).abs().max() < 0.7 * K_BOUNDS[kind]
    assert (back[4, 7] - 40.0).abs() < 40.0 * K_BOUNDS[kind]  # the outlier sets its block's scale: kept
    assert np.array_equal(quantize(x, kind), blocks)  # deterministic (threads split rows, never a row)


def test_unknown_type_and_bad_row_length_are_refused():
    with pytest.raises(QuantizeError, match="unknown quantization type 'q3_xl'.*Q4_K_M"):
        scheme_name("q3_xl")
    assert scheme_name("q4_k") == "Q4_K_M" and scheme_name("q8_0") == "Q8_0"
    with pytest.raises(QuantizeError, match="do not divide a row of 100"):
        quantize(torch.zeros(2, 100), "Q8_0")
    with pytest.raises(QuantizeError, match="no quantizer for IQ2_XS"):
        quantize(torch.zeros(2, 256), "IQ2_XS")


def test_type_rules_are_llama_cpps():
    types = {n: tensor_type(n, s, "Q4_K_M", 32, False) for n, s in _shapes(32, 4096).items()}
    more_bits = [i for i in range(32) if types[f"layers.{i}.attention.wv.weight"] == "Q6_K"]
    assert more_bits == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]  # llama.cpp's use_more_bits
    assert all(types[f"layers.{i}.feed_forward.w2.weight"] == ("Q6_K" if i in more_bits else "Q4_K") for i in range(32))
    assert types["output.weight"] == "Q6_K" and types["tok_embeddings.weight"] == "Q4_K"
    assert types["layers.5.attention.wq.weight"] == "Q4_K" and types["norm.weight"] == "F32"
    assert tensor_type("output.weight", (32000, 4096), "Q4_0", 32, False) == "Q6_K"  # as llama-quantize Q4_0
    assert tensor_type("output.weight", (32000, 4096), "Q8_0", 32, False) == "Q8_0"
    assert tensor_type("tok_embeddings.weight", (49152, 576), "Q4_K_M", 30, True) == "Q8_0"  # tied, 576 % 256
    assert tensor_type("layers.3.attention.wq.weight", (576, 576), "Q4_K_M", 30, True) == "Q5_0"  # fallbacks
    assert tensor_type("layers.3.attention.wq.weight", (576, 576), "Q5_K_M", 30, True) == "Q5_1"
    assert tensor_type("layers.3.feed_forward.w2.weight", (576, 1536), "Q6_K", 30, True) == "Q6_K"
    assert tensor_type("layers.3.attention.wq.weight", (8, 40), "Q8_0", 30, True) == "F16"


def _shapes(n_layers: int, dim: int) -> dict[str, tuple[int, ...]]:
    names = {"tok_embeddings.weight": (32000, dim), "output.weight": (32000, dim), "norm.weight": (dim,)}
    for i in range(n_layers):
        for p in ("attention.wq", "attention.wv", "feed_forward.w2"):
            names[f"layers.{i}.{p}.weight"] = (dim, dim)
    return names


@pytest.fixture(scope="module")
def state():
    """bf16 weights of std 0.05 (test_weights' 0.2 at dim 256 makes attention so peaked that any noise flips it)."""
    return {k: (v * 0.25 if v.dim() > 1 else v).bfloat16() for k, v in random_state(ARGS).items()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, state):
    root = tmp_path_factory.mktemp("quantize")
    for layout, save in (("mistral", save_mistral), ("hf", save_hf)):
        save(root / layout, state, ARGS)
        (root / layout / "tokenizer.model").symlink_to(MISTRAL_V1)
    return root


def _gguf(folders, scheme: str) -> Path:
    out = folders / f"{scheme}.gguf"
    if not out.exists():
        ckpt = open_checkpoint(folders / "mistral")
        write_gguf(ckpt, out, scheme, tokenizer=load_tokenizer(ckpt.path), progress=False)
    return out


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


@pytest.mark.parametrize("scheme", ["Q8_0", "Q4_K_M", "Q4_0"])
def test_gale_loads_its_own_gguf_back_with_the_logits_of_quantize_on_load(folders, scheme):
    out = _gguf(folders, scheme)
    ckpt = open_checkpoint(out)
    assert ckpt.storage == planned_types(open_checkpoint(folders / "mistral"), scheme)
    assert ckpt.args == ARGS
    on_load = load_model(folders / "mistral", quantize=scheme, progress=False)
    assert torch.equal(_logits(load_model(out, keep_quantized=True, progress=False)), _logits(on_load))
    # the quantized model stays near the bf16 one it came from (measured: 2.4%, 31%, 31% of the largest logit)
    reference = _logits(load_model(folders / "mistral", progress=False))
    bound = {"Q8_0": 0.04, "Q4_K_M": 0.4, "Q4_0": 0.4}[scheme] * reference.abs().max()
    assert (_logits(on_load) - reference).abs().max() < bound


def test_hf_and_official_folders_quantize_to_the_same_blocks(folders):
    hf = load_model(folders / "hf", quantize="q4_k", progress=False)
    official = load_model(folders / "mistral", quantize="q4_k", progress=False)
    assert np.array_equal(hf.layers[1].attention.wq.blocks, official.layers[1].attention.wq.blocks)
    assert torch.equal(_logits(hf), _logits(official))


def test_quantize_on_load_keeps_blocks_not_fp32(folders):
    model = load_model(folders / "mistral", quantize="Q8_0", progress=False)
    assert isinstance(model.output, QuantLinear) and isinstance(model.layers[0].feed_forward.w2, QuantLinear)
    assert isinstance(model.tok_embeddings, QuantEmbedding)  # untied: its own blocks, looked up by row
    assert model.decode_kernel is not None
    plain = load_model(folders / "mistral", progress=False)
    emb = model.tok_embeddings(TOKENS)
    assert (emb - plain.tok_embeddings(TOKENS)).abs().max() < 0.01  # Q8_0 of N(0, 0.2) weights


def test_gguf_metadata_carries_tokenizer_and_model(folders):
    out = _gguf(folders, "Q8_0")
    ckpt = open_checkpoint(out)
    meta = ckpt.gguf_metadata
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 7
    assert meta["llama.attention.sliding_window"] == 16
    theirs, ours = load_tokenizer(out, gguf_metadata=meta), load_tokenizer(folders / "mistral")
    text = "Hello world, [INST] ünïcode 😀 [/INST]"
    assert theirs.encode(text) == ours.encode(text) and theirs.vocab_size == 32000


def test_shapes_not_matching_the_config_write_nothing(folders, tmp_path):
    folder = shutil.copytree(folders / "mistral", tmp_path / "m", symlinks=True)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "hidden_dim": 384}))
    with pytest.raises(CheckpointError, match=r"feed_forward.w1.weight has shape \(512, 256\).*\(384, 256\)"):
        write_gguf(open_checkpoint(folder), tmp_path / "out.gguf", "Q8_0", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_full_disk_removes_the_partial_file(folders, tmp_path, monkeypatch):
    calls = []

    def full(self, tensor):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor)

    real = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    ckpt = open_checkpoint(folders / "mistral")
    with pytest.raises(QuantizeError, match="disk is full.*partial file was removed"):
        write_gguf(ckpt, tmp_path / "out.gguf", "Q8_0", tokenizer=load_tokenizer(ckpt.path), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_quantize_and_its_errors(folders, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert cli.main(["quantize", str(folders / "hf"), str(out), "--type", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert open_checkpoint(out).storage["output.weight"] == "Q8_0"
    assert cli.main(["quantize", str(folders / "hf"), str(tmp_path / "x.gguf"), "--type", "Q2_XL"]) == 2
    assert "unknown quantization type 'Q2_XL'" in capsys.readouterr().err
    assert cli.main(["generate", "hi", "-m", str(out), "--quantize", "q4_0", "--max-tokens", "1"]) == 2
    assert "already in its blocks" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_block_types_without_a_kernel_load_as_fp32_and_say_so(tmp_path, capsys):
    state = random_state(ARGS)
    kinds = {"layers.0.attention.wq.weight": Q.Q5_0, "layers.1.attention.wq.weight": Q.Q5_0,
             "layers.0.feed_forward.w1.weight": Q.Q8_0}
    write_reference_gguf(tmp_path / "m.gguf", state, ARGS, kinds)
    model = load_model(tmp_path / "m.gguf", keep_quantized=True, progress=False)
    assert "Q5_0" not in KINDS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CPU kernel for Q5_0 (layers.0.attention.wq.weight and 1 more)" in err
    assert isinstance(model.layers[0].attention.wq, torch.nn.Linear)
    assert isinstance(model.layers[0].feed_forward.w1, QuantLinear)
    plain = load_model(tmp_path / "m.gguf", progress=False)
    assert (_logits(model) - _logits(plain)).abs().max() < 1e-4


def test_auto_quantizes_only_what_does_not_fit(folders, monkeypatch, capsys):
    from gale import llm

    ckpt = open_checkpoint(folders / "mistral")
    fp32 = ckpt.args.n_params * 4
    monkeypatch.setattr(llm, "available_memory", lambda: 10 * fp32)
    assert llm.choose_quantize(ckpt, "auto", "cpu", torch.float32) is None
    monkeypatch.setattr(llm, "available_memory", lambda: fp32 // 2)
    assert llm.choose_quantize(ckpt, "auto", "cpu", torch.float32) == "Q8_0"
    assert "would not fit" in capsys.readouterr().err
    monkeypatch.setattr(llm, "available_memory", lambda: fp32 // 6)
    assert llm.choose_quantize(ckpt, "auto", "cpu", torch.float32) in ("Q4_K_M", "Q4_0")
    assert llm.choose_quantize(ckpt, "none", "cpu", torch.float32) is None
    assert llm.choose_quantize(ckpt, "auto", "cuda", torch.bfloat16) is None
    with pytest.raises(ValueError, match="CPU kernels"):
        load_model(ckpt, quantize="q8_0", dtype=torch.bfloat16)


# --- llama.cpp itself (llama-cpp-python; not installed in CI) -------------------------------------------------

def _llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.mark.parametrize("scheme", ["Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0"])
def test_llama_cpp_quantizer_writes_the_same_blocks(folders, tmp_path, scheme):
    """llama.cpp's llama_model_quantize of an F32 GGUF of the same weights: same type per tensor, same bytes."""
    llama_cpp = _llama_cpp()
    f32 = _gguf(folders, "F32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{scheme}")
    theirs = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0
    a, b = open_checkpoint(theirs), open_checkpoint(_gguf(folders, scheme))
    assert a.storage == b.storage
    for name, kind in a.storage.items():
        if kind in FORMATS:
            assert np.array_equal(a.read_blocks(name), b.read_blocks(name)), name


@pytest.mark.parametrize("scheme", ["Q8_0", "Q4_K_M"])
def test_llama_cpp_loads_gales_gguf_and_logits_agree(folders, scheme):
    llama_cpp = _llama_cpp()
    out = _gguf(folders, scheme)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(TOKENS.tolist())
    theirs = torch.tensor(np.array(llm.scores[: len(TOKENS)]), dtype=torch.float32)
    ours = _logits(load_model(out, keep_quantized=True, progress=False))
    # llama.cpp rounds activations to 8 bits (Q8 dot products) where Gale keeps fp32: quantization noise
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


def test_gale_quantize_requantizes_a_gguf_and_keeps_its_tokenizer(folders, tmp_path):
    src = open_checkpoint(_gguf(folders, "Q8_0"))
    out = write_gguf(src, tmp_path / "q4.gguf", "Q4_0", tokenizer=load_tokenizer(src.path, src.gguf_metadata),
                     progress=False)
    ckpt = open_checkpoint(out)
    assert ckpt.storage["layers.0.attention.wq.weight"] == "Q4_0" and ckpt.storage["output.weight"] == "Q6_K"
    keys = [k for k in src.gguf_metadata if k.startswith("tokenizer.")]
    assert all(ckpt.gguf_metadata[k] == src.gguf_metadata[k] for k in keys)
    assert torch.equal(_logits(load_model(out, keep_quantized=True, progress=False)),
                       _logits(load_model(src, quantize="Q4_0", progress=False)))  # from the Q8_0 values


def test_byte_level_bpe_tokenizer_metadata_rebuilds_the_same_tokenizer(smollm2_path):
    from gale.weights.export import tokenizer_metadata

    ckpt = open_checkpoint(smollm2_path)
    tok = load_tokenizer(ckpt.path, gguf_metadata=ckpt.gguf_metadata)
    meta = {k: v for k, (v, _) in tokenizer_metadata(tok).items()}  # as from a tokenizer.json: no GGUF source
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == tok.vocab_size
    rebuilt = load_tokenizer(Path("x.gguf"), gguf_metadata=meta)
    for text in ("Hello world", "<|im_start|>user\nhi<|im_end|>", "  spaces\tand ünïcode 😀 1234"):
        assert rebuilt.encode(text) == tok.encode(text), text
