"""config.json, params.json and GGUF metadata as each writer spells them; RoPE scaling refused in every spelling."""

import json

import pytest

from gale.config import from_gguf_metadata, from_hf_config, from_params_json

V4 = {"model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50, "max_position_embeddings": 512,
      "rms_norm_eps": 1e-6, "sliding_window": 16, "rope_theta": 500000.0, "torch_dtype": "float32"}
# The same model as transformers 5 writes it: the base moved into rope_parameters, torch_dtype became dtype.
V5 = {**{k: v for k, v in V4.items() if k not in ("rope_theta", "torch_dtype")}, "dtype": "float32",
      "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}
PARAMS = {"dim": 64, "n_layers": 2, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 50,
          "rope_theta": 1e6}
GGUF = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
        "llama.block_count": 2, "llama.feed_forward_length": 128, "llama.vocab_size": 50}


def test_transformers_5_config_reads_as_transformers_4_config():
    assert from_hf_config(V5) == from_hf_config(V4)
    assert from_hf_config(V5).rope_theta == 500000.0 and from_hf_config(V5).sliding_window == 16


def test_a_config_transformers_5_saved_itself(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=128, num_hidden_layers=2, vocab_size=50, rope_theta=123456.0,
                                     sliding_window=32, max_position_embeddings=1024)
    cfg.save_pretrained(tmp_path)
    args = from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert (args.rope_theta, args.sliding_window, args.max_seq_len, args.norm_eps) == (123456.0, 32, 1024, 1e-6)
    assert (args.n_kv_heads, args.head_dim) == (2, 16)


def test_per_layer_rope_parameters_that_agree_are_one():
    same = {"rope_type": "default", "rope_theta": 2e5}
    d = {**V5, "rope_parameters": {"full_attention": same, "sliding_attention": dict(same)}}
    assert from_hf_config(d).rope_theta == 2e5


SCALED = [
    ("rope_scaling", {"type": "linear", "factor": 2.0}),  # transformers 4, old key
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),  # transformers 4, new key
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),  # transformers 5
    ("rope_parameters", {"type": "longrope", "rope_theta": 1e6}),
    ("rope_parameters", {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e6}),  # disagrees with V4's rope_theta
]


@pytest.mark.parametrize("key,value", SCALED)
def test_rope_that_gale_does_not_compute_is_refused(key, value):
    with pytest.raises(ValueError, match="RoPE|rope|rotary"):
        from_hf_config({**V4, key: value})


def test_rope_scaling_is_refused_in_params_json_and_gguf():
    assert from_params_json(PARAMS).rope_theta == 1e6
    for extra in ({"yarn": {"factor": 4.0}}, {"rope_scaling": {"type": "linear", "factor": 2.0}}):
        with pytest.raises(ValueError, match="RoPE scaling"):
            from_params_json({**PARAMS, **extra})
    assert from_gguf_metadata({**GGUF, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 1.0},
                              False).rope_theta == 10000.0
    for extra in ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0},
                  {"llama.rope.scale_linear": 2.0}):
        with pytest.raises(ValueError, match="RoPE scaling"):
            from_gguf_metadata({**GGUF, **extra}, False)


def test_layer_types_and_unsupported_layers():
    assert from_hf_config({**V5, "layer_types": ["full_attention"] * 2}).sliding_window is None
    assert from_hf_config({**V5, "layer_types": ["sliding_attention"] * 2}).sliding_window == 16
    bad = [{"layer_types": ["full_attention", "sliding_attention"]}, {"attention_bias": True}, {"mlp_bias": True},
           {"hidden_act": "gelu"}]
    for extra in bad:
        with pytest.raises(ValueError, match="not supported|same attention"):
            from_hf_config({**V5, **extra})
