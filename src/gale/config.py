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
    """Official Mistral `params.json` (keys as in mistral-inference; its `yarn` or `rope_scaling` is refused)."""
    if d.get("yarn"):
        _refuse_rope_scaling("yarn", "params.json")
    if d.get("rope_scaling"):
        scaling = d["rope_scaling"]
        _refuse_rope_scaling(scaling.get("rope_type", scaling.get("type", "?")) if isinstance(scaling, dict)
                             else scaling, "params.json rope_scaling")
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


def _refuse_rope_scaling(kind: Any, where: str) -> None:
    """Gale rotates by plain RoPE only; any other type would load and quietly compute something else."""
    if kind not in (None, "default"):
        raise ValueError(f"{where}: RoPE scaling {kind!r} is not implemented (Gale applies plain RoPE only)")


def _hf_rope_theta(d: dict[str, Any]) -> float:
    """RoPE's base from a config.json in either spelling, refusing what Gale does not compute.

    transformers < 5 writes top-level `rope_theta` and `rope_scaling` ({"type" or "rope_type": ..., "factor"});
    transformers >= 5 writes `rope_parameters` = {"rope_type", "rope_theta", ...} (scaling merged in), possibly one
    such dict per layer type, and may move `partial_rotary_factor` inside it.
    """
    params = d.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type: Gale has one RoPE
        if len({repr(sorted(v.items())) for v in params.values()}) > 1:
            raise ValueError(f"rope_parameters differ by layer type ({sorted(params)}): not supported")
        params = next(iter(params.values()))
    for where, p in (("rope_parameters", params), ("rope_scaling", d.get("rope_scaling") or {})):
        _refuse_rope_scaling(p.get("rope_type", p.get("type")), where)
        partial = p.get("partial_rotary_factor", d.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor={partial} is not supported (Gale rotates every dimension)")
    if "rope_theta" in params and "rope_theta" in d and float(params["rope_theta"]) != float(d["rope_theta"]):
        raise ValueError(f"config.json has two RoPE bases: rope_theta={d['rope_theta']} and "
                         f"rope_parameters.rope_theta={params['rope_theta']}")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def _hf_window(d: dict[str, Any], arch: str) -> int | None:
    """The sliding window of a config.json: Mistral's `sliding_window` (unless `use_sliding_window` is false),
    or `layer_types` when every layer is "sliding_attention"; layers that mix both are refused."""
    kinds = set(d.get("layer_types") or ())
    if len(kinds) > 1:
        raise ValueError(f"layer_types mixes {sorted(kinds)}: Gale gives every layer the same attention")
    if arch != "mistral" or not d.get("use_sliding_window", True) or kinds == {"full_attention"}:
        return None
    return _window(d.get("sliding_window"))


def _refuse_unsupported(d: dict[str, Any]) -> None:
    """Fields whose non-default values Gale's model does not compute (biases, another activation)."""
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise ValueError(f"{key}=true is not supported: Gale's layers have no biases")
    if d.get("hidden_act", d.get("hidden_activation", "silu")) != "silu":
        raise ValueError(f"hidden_act={d.get('hidden_act')!r} is not supported: Gale's feed-forward is SwiGLU (silu)")


def from_hf_config(d: dict[str, Any]) -> ModelArgs:
    """Hugging Face `config.json` of a Mistral or Llama model, as transformers 4 or 5 writes it."""
    arch = d.get("model_type", "mistral")
    if arch not in ("mistral", "llama"):
        raise ValueError(f"unsupported model_type {arch!r}: Gale runs Mistral and Llama architectures")
    _refuse_unsupported(d)
    return ModelArgs(
        dim=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
        hidden_dim=d["intermediate_size"],
        n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        vocab_size=d["vocab_size"],
        sliding_window=_hf_window(d, arch),
        max_seq_len=d.get("max_position_embeddings", 8192),
        rope_theta=_hf_rope_theta(d),
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

    scaling, factor = meta.get(f"{arch}.rope.scaling.type"), meta.get(f"{arch}.rope.scaling.factor", 1.0)
    if (scaling not in (None, "none") and factor not in (0, 1)) or meta.get(f"{arch}.rope.scale_linear", 1) != 1:
        _refuse_rope_scaling(scaling or "linear", f"GGUF {arch}.rope.scaling")
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
