"""Hugging Face layout: `model.layers.0.self_attn.q_proj.weight` names and rotate-half RoPE rows."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelArgs, from_hf_config
from .checkpoint import Checkpoint, CheckpointError
from .safetensors_files import SafetensorsIndex

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


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from e
        return [folder / f for f in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if list(folder.glob("*.bin")):
        raise CheckpointError(f"{folder}: only PyTorch .bin weights; convert them to safetensors first")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def open_hf(folder: Path) -> Checkpoint:
    try:
        args = from_hf_config(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: cannot read model config ({e!r})") from e
    index = SafetensorsIndex(_weight_files(folder))
    ours: dict[str, str] = {}
    ignored = []
    for stored in index.entries:
        name = canonical_name(stored)
        if stored.endswith("rotary_emb.inv_freq") or (name == "output.weight" and args.tie_embeddings):
            ignored.append(stored)  # buffers some exports carry, or an lm_head duplicating the tied embedding
        else:
            ours[name or stored] = stored
    return Checkpoint(
        path=folder, format="hf", args=args,
        shapes={n: index.entries[s][1] for n, s in ours.items()},
        storage={n: index.entries[s][2] for n, s in ours.items()},
        files={n: index.entries[s][0] for n, s in ours.items()},
        read=lambda name: from_hf(ours[name], index.read(ours[name]), args)[1],
        ignored=tuple(ignored),
    )
