"""Hugging Face layout: `model.layers.0.self_attn.q_proj.weight` names and rotate-half RoPE rows."""

from __future__ import annotations

import torch

from ..config import ModelArgs

_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight"}


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved rotary rows (Mistral/Meta/GGUF) -> HF rotate-half rows, per head."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_to_hf`."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


def canonical_name(hf_name: str) -> str | None:
    """Gale name of an HF tensor name, or None when it is not a model weight we know."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        mapped = _LAYER_NAMES.get(".".join(parts[3:-1]))
        if mapped:
            return f"layers.{parts[2]}.{mapped}.{parts[-1]}"
    return None


def hf_name(name: str) -> str:
    """HF name of a Gale tensor name."""
    for hf, ours in _TOP_NAMES.items():
        if ours == name:
            return hf
    _, i, *rest = name.split(".")
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    return f"model.layers.{i}.{inverse['.'.join(rest[:-1])]}.{rest[-1]}"


def from_hf(name: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """(Gale name, tensor in Gale's RoPE layout) for one HF tensor; KeyError for unknown names."""
    ours = canonical_name(name)
    if ours is None:
        raise KeyError(name)
    if ours.endswith("attention.wq.weight"):
        tensor = permute_from_hf(tensor, args.n_heads)
    elif ours.endswith("attention.wk.weight"):
        tensor = permute_from_hf(tensor, args.n_kv_heads)
    return ours, tensor


def to_hf(name: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """(HF name, tensor in HF's RoPE layout) for one Gale tensor."""
    if name.endswith("attention.wq.weight"):
        tensor = permute_to_hf(tensor, args.n_heads)
    elif name.endswith("attention.wk.weight"):
        tensor = permute_to_hf(tensor, args.n_kv_heads)
    return hf_name(name), tensor
