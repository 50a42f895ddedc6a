"""The three checkpoint layouts load to identical tensors and logits; bad files fail clearly, naming the culprit."""

import json
import shutil
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file
from transformers import MistralForCausalLM

from gale.config import ModelArgs
from gale.model import Transformer
from gale.weights import CheckpointError, describe_checkpoint, load_model, open_checkpoint, save_hf, save_mistral
from gale.weights import gguf as gguf_module
from gale.weights.gguf import _Header, gale_to_gguf_name

ARGS = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=96,
                 sliding_window=8, max_seq_len=256)
Q = gguf.GGMLQuantizationType


def random_state(args: ModelArgs = ARGS, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = Transformer(args)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in m.state_dict().items()}


def write_gguf(path, state, args: ModelArgs, kinds=None, raw=None) -> None:
    """A llama-architecture GGUF as llama.cpp writes it; `kinds` picks a storage type per tensor name and `raw`
    gives already-encoded (bytes, type) tensors for types the gguf package cannot quantize."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_key_length(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    if args.sliding_window:
        w.add_uint32("llama.attention.sliding_window", args.sliding_window)
    for name, t in state.items():
        kind = (kinds or {}).get(name, Q.F32)
        data = t.float().numpy()
        if name in (raw or {}):
            w.add_tensor(gale_to_gguf_name(name), raw[name][0], raw_dtype=raw[name][1])
        elif kind == Q.F32:
            w.add_tensor(gale_to_gguf_name(name), data)
        else:
            w.add_tensor(gale_to_gguf_name(name), quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def state():
    return random_state()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, state):
    root = tmp_path_factory.mktemp("ckpt")
    save_mistral(root / "mistral", state, ARGS)
    save_hf(root / "hf", state, ARGS)
    save_hf(root / "hf_sharded", state, ARGS, max_shard_bytes=40_000)
    write_gguf(root / "model.gguf", state, ARGS)
    return root


TOKENS = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("layout", ["mistral", "hf", "hf_sharded", "model.gguf"])
def test_every_layout_loads_identical_tensors_and_logits(folders, state, layout):
    ckpt = open_checkpoint(folders / layout)
    assert ckpt.args == ARGS
    model = load_model(ckpt, progress=False)
    for name, t in model.state_dict().items():
        assert torch.equal(t, state[name]), name
    reference = Transformer(ARGS).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(model(TOKENS), reference(TOKENS))


def test_sharded_folder_has_an_index_and_several_files(folders):
    index = json.loads((folders / "hf_sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_hf_folder_is_what_transformers_loads_and_logits_agree(folders):
    hf = MistralForCausalLM.from_pretrained(folders / "hf", attn_implementation="eager").eval()
    ours = load_model(folders / "mistral", progress=False)
    with torch.no_grad():
        diff = (hf(TOKENS[None]).logits[0] - ours(TOKENS)).abs().max().item()
    assert diff < 1e-4


def test_v01_params_json_without_rope_theta_gets_1e4(folders, tmp_path):
    folder = shutil.copytree(folders / "mistral", tmp_path / "m")
    params = json.loads((folder / "params.json").read_text())
    params.pop("rope_theta"), params.pop("max_seq_len")
    (folder / "params.json").write_text(json.dumps(params))
    args = open_checkpoint(folder).args
    assert args.rope_theta == 1e4 and args.max_seq_len == 8192 and args.sliding_window == 8


def k_quant_blocks(kind, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random K-quant blocks with sane fp16 scales (the gguf package can only dequantize these types)."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, (rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if kind == Q.Q6_K:
        raw[..., -2:] = scales[..., :2]  # d is the last field
    else:
        raw[..., :4] = scales  # d, dmin come first
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_gguf_quantization_types_dequantize_to_what_gguf_computes(tmp_path, kind):
    args = ModelArgs(dim=256, n_layers=1, head_dim=64, hidden_dim=256, n_heads=4, n_kv_heads=2, vocab_size=64,
                     sliding_window=None, max_seq_len=64)
    state = random_state(args)
    name = "layers.0.feed_forward.w1.weight"
    path = tmp_path / "q.gguf"
    if kind in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        raw = k_quant_blocks(kind, 256, 256)
        expected = dequantize(raw, kind)
        write_gguf(path, state, args, raw={name: (raw, kind)})
    else:
        write_gguf(path, state, args, kinds={name: kind})
        expected = dequantize(quantize(state[name].numpy(), kind), kind)
    ckpt = open_checkpoint(path)
    assert ckpt.storage[name] == kind.name and kind.name in describe_checkpoint(ckpt)
    loaded = load_model(ckpt, progress=False).state_dict()[name]
    assert np.isfinite(expected).all() and torch.equal(loaded, torch.from_numpy(expected))
    if kind not in (Q.Q4_K, Q.Q5_K, Q.Q6_K):  # quantization error is bounded: the tensor is the one we wrote
        assert (loaded - state[name]).abs().max() < 0.2 * state[name].abs().max()


# --- real weights ---------------------------------------------------------------------------------------------


def test_smollm2_gguf_logits_and_greedy_tokens_equal_transformers(smollm2_path, smollm2_hf):
    ours = load_model(smollm2_path, progress=False)
    prompt = torch.randint(0, ours.args.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(prompt) - smollm2_hf(prompt[None]).logits[0]).abs().max().item()
        assert diff < 1e-3, diff
        ids, theirs = prompt[:16].tolist(), smollm2_hf.generate(prompt[None, :16], max_new_tokens=32, do_sample=False,
                                                               min_new_tokens=32)[0, 16:].tolist()
        for _ in range(32):
            ids.append(int(ours(torch.tensor(ids))[-1].argmax()))
    assert ids[16:] == theirs


# --- bad files ---------------------------------------------------------------------------------------------------


def rewrite_safetensors(folder, fn):
    path = folder / "consolidated.safetensors"
    save_file(fn(load_file(path)), str(path))
    return path


@pytest.fixture
def mistral_copy(folders, tmp_path):
    return shutil.copytree(folders / "mistral", tmp_path / "m")


def expect_error(path, *words):
    with pytest.raises(CheckpointError) as e:
        load_model(path, progress=False)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_missing_path_and_unknown_folder(tmp_path):
    expect_error(tmp_path / "nope", "nope", "no such file")
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", "params.json", "config.json")


def test_missing_tensor(mistral_copy):
    rewrite_safetensors(mistral_copy, lambda s: {k: v for k, v in s.items() if k != "layers.1.attention.wk.weight"})
    expect_error(mistral_copy, "missing", "layers.1.attention.wk.weight")


def test_unexpected_tensor(mistral_copy):
    path = rewrite_safetensors(mistral_copy, lambda s: {**s, "layers.9.attention.wq.weight": torch.zeros(2)})
    expect_error(mistral_copy, "unexpected", "layers.9.attention.wq.weight", str(path))


def test_wrong_shape(mistral_copy):
    path = rewrite_safetensors(mistral_copy, lambda s: {**s, "norm.weight": torch.ones(63)})
    expect_error(mistral_copy, "norm.weight", "(63,)", "(64,)", str(path))


def test_truncated_safetensors(mistral_copy):
    path = mistral_copy / "consolidated.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    expect_error(mistral_copy, str(path))


def test_bad_params_json(mistral_copy):
    (mistral_copy / "params.json").write_text('{"dim": 64')
    expect_error(mistral_copy, "params.json")


def test_missing_hf_shard(folders, tmp_path):
    folder = shutil.copytree(folders / "hf_sharded", tmp_path / "h")
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    victim.unlink()
    expect_error(folder, victim.name, "not found")


def test_truncated_gguf(folders, tmp_path):
    path = tmp_path / "t.gguf"
    path.write_bytes((folders / "model.gguf").read_bytes()[:-1000])
    expect_error(path, str(path), "truncated")
    for cut in (200, 2000, 20000):  # inside the metadata: its strings and string arrays (a vocabulary)
        path.write_bytes((folders / "model.gguf").read_bytes()[:cut])
        expect_error(path, str(path))


def test_unsupported_gguf_quantization(tmp_path, state):
    path = tmp_path / "q81.gguf"
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = {"layers.0.attention.wq.weight": (np.zeros((64, 64 // block * size), np.uint8), Q.Q8_1)}
    write_gguf(path, state, ARGS, raw=raw)
    expect_error(path, "layers.0.attention.wq.weight", "Q8_1", "not supported")


def test_a_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 64)
    expect_error(path, ".gguf")


def test_gguf_cut_inside_its_vocabulary(smollm2_path, tmp_path):
    """The default model's header cut in the middle of its 49152-string vocabulary, inside a string's 8-byte
    length or its bytes (12 cuts in a row span a string or two of ~6 bytes): a clear error, not a short
    vocabulary."""
    path = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        head = f.read(300_012)
    for cut in range(300_000, 300_012):
        path.write_bytes(head[:cut])
        expect_error(path, str(path), "past the end")


def gguf_with_strings(path, strings: list[bytes]) -> None:
    """A GGUF v3 file with no tensors and one metadata key: the string array `strings`, written by hand so
    that it may hold what GGUFWriter would not (a '\\0' inside a string, bytes that are not UTF-8)."""
    def string(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b
    body = string(b"test.strings") + struct.pack("<IIQ", 9, 8, len(strings)) + b"".join(map(string, strings))
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)


@pytest.mark.parametrize("strings", [
    [], [b""], [b"hi", b"", b"\xe2\x96\x81the"],  # empty arrays and strings, a multi-byte character
    [b"a\0b", b"c"],  # a '\0' inside a string: the C packing cannot split it, the Python loop reads it
    [b"\xff\xfe", b"ok", b"\xe2\x96"],  # not UTF-8: replacement characters, one per bad sequence
], ids=["none", "one-empty", "plain", "nul-inside", "bad-utf8"])
def test_gguf_string_arrays_read_the_same_with_and_without_the_c_library(tmp_path, strings, monkeypatch):
    path = tmp_path / "s.gguf"
    gguf_with_strings(path, strings)
    expected = [s.decode("utf-8", "replace") for s in strings]
    assert _Header(path).metadata["test.strings"] == expected
    monkeypatch.setattr(gguf_module, "_library", lambda: None)
    assert _Header(path).metadata["test.strings"] == expected


def test_smollm2_header_reads_the_same_with_and_without_the_c_library(smollm2_path, monkeypatch):
    if gguf_module._library() is None:
        pytest.skip("no C compiler for the kernels")
    packed = _Header(smollm2_path).metadata
    monkeypatch.setattr(gguf_module, "_library", lambda: None)
    assert _Header(smollm2_path).metadata == packed
    assert len(packed["tokenizer.ggml.tokens"]) == 49152 and len(packed["tokenizer.ggml.merges"]) > 40000
