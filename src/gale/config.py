"""Model hyper-parameters, and how each checkpoint format spells them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ModelArgs:
    """Defaults are Mistral 7B v0.1 (paper, Table 1).

    `sliding_window=None` means full causal attention (Llama-family models, Mistral v0.2+).
    `rope_theta` defaults to 1e4 because v0.1's params.json omits it; v0.2+ files set 1e6 explicitly.
    """

    dim: int = 4096
    n_layers: int = 32
    head_dim: int = 128
    hidden_dim: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 32000
    sliding_window: int | None = 4096
    max_seq_len: int = 8192
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or None")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + ffn + 2 * self.dim) + emb + self.dim


def _window(value: Any) -> int | None:
    # Checkpoints write "no window" as null, 0, a missing key, or a window >= the context.
    return int(value) if value else None


def from_params_json(d: dict[str, Any], vocab_size: int | None = None) -> ModelArgs:
    """Official Mistral `params.json` (keys as in mistral-inference)."""
    return ModelArgs(
        dim=d["dim"],
        n_layers=d["n_layers"],
        head_dim=d.get("head_dim", d["dim"] // d["n_heads"]),
        hidden_dim=d["hidden_dim"],
        n_heads=d["n_heads"],
        n_kv_heads=d.get("n_kv_heads", d["n_heads"]),
        vocab_size=d.get("vocab_size", vocab_size or 32000),
        sliding_window=_window(d.get("sliding_window")),
        max_seq_len=d.get("max_seq_len", d.get("max_position_embeddings", 8192)),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        norm_eps=d.get("norm_eps", 1e-5),
        tie_embeddings=d.get("tied_embeddings", d.get("tie_embeddings", False)),
    )


def from_hf_config(d: dict[str, Any]) -> ModelArgs:
    """Hugging Face `config.json` of a Mistral or Llama model."""
    arch = d.get("model_type", "mistral")
    if arch not in ("mistral", "llama"):
        raise ValueError(f"unsupported model_type {arch!r}: Gale runs Mistral and Llama architectures")
    if d.get("rope_scaling"):
        raise ValueError(f"rope_scaling {d['rope_scaling']!r} is not supported")
    use_window = d.get("use_sliding_window", True)
    return ModelArgs(
        dim=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
        hidden_dim=d["intermediate_size"],
        n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        vocab_size=d["vocab_size"],
        sliding_window=_window(d.get("sliding_window")) if arch == "mistral" and use_window else None,
        max_seq_len=d.get("max_position_embeddings", 8192),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        norm_eps=d.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


def to_hf_config(args: ModelArgs) -> dict[str, Any]:
    """The `config.json` transformers needs to build the same model (used by merge/export and tests)."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "sliding_window": args.sliding_window,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def to_params_json(args: ModelArgs) -> dict[str, Any]:
    """The official `params.json` for these args."""
    d = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "head_dim": args.head_dim,
        "hidden_dim": args.hidden_dim,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta,
        "max_seq_len": args.max_seq_len,
    }
    if args.sliding_window is not None:
        d["sliding_window"] = args.sliding_window
    if args.tie_embeddings:
        d["tied_embeddings"] = True
    return d


def _f32(x: float) -> float:
    # GGUF stores float32: 1e-5 comes back as 9.999999747e-06. Seven significant digits recover the written value.
    return float(f"{float(x):.7g}")


def from_gguf_metadata(meta: dict[str, Any], tie_embeddings: bool) -> ModelArgs:
    """GGUF key/values (already decoded to Python values) of a llama-architecture file.

    llama.cpp files Mistral v0.1 under arch "llama" and usually drops its window; a
    `llama.attention.sliding_window` key is honoured when present. Tying is not in the metadata:
    the caller says whether the file lacks `output.weight`.
    """
    arch = meta.get("general.architecture")
    if arch not in ("llama", "mistral"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}: Gale runs llama-architecture files")

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{name}")
        return value

    dim, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ())) or None
    if vocab is None:
        raise ValueError(f"GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens")
    return ModelArgs(
        dim=dim,
        n_layers=int(key("block_count")),
        head_dim=int(key("attention.key_length", dim // n_heads)),
        hidden_dim=int(key("feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        vocab_size=int(vocab),
        sliding_window=_window(meta.get(f"{arch}.attention.sliding_window")),
        max_seq_len=int(key("context_length", 8192)),
        rope_theta=_f32(key("rope.freq_base", 10000.0)),
        norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=tie_embeddings,
    )
