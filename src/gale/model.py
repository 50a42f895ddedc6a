"""The Mistral transformer: one forward over packed, variable-length sequences.

Parameter names and the RoPE layout are those of the official Mistral checkpoints
(`layers.0.attention.wq.weight`, interleaved rotary pairs); the loaders in `gale.weights`
convert every other format to them, so this file knows one layout only.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .attention import QUERY_BLOCK, decode_attention, pays, prefill_by_blocks
from .cache import BatchMeta, RollingCache, plan
from .config import ModelArgs


class DecodeHook(Protocol):
    """All layers of a decode step and the final norm in one call (gale.quant.DecodeKernel), which the loader
    installs as `Transformer.decode_kernel` for CPU models whose projections are all quantized.

    Returns the final-norm hidden states `[B, dim]` after writing the step's keys/values into `cache`, or None
    to decline (the model then runs its layers). It attends every entry of a sequence's buffer without the
    plan's mask, so it needs each stored key inside the window: `cache.capacity <= cache.window` (or no
    window, where the cache refuses to outgrow its capacity). `Transformer.hidden_states` asserts that.
    """

    def __call__(self, h: torch.Tensor, meta: BatchMeta, cache: RollingCache) -> torch.Tensor | None: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as the reference does) so bf16/fp16 runs keep their accuracy; then scale.
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


def rope_rotations(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Unit complex rotations for absolute positions `[N]` -> `[N, 1, head_dim/2]` (complex64)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles), angles)[:, None, :]


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of `x: [N, heads, head_dim]`, as Mistral's checkpoints expect:
    each pair is a complex number, so the rotation is one complex product (as in mistral-inference)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotations).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window
        # Prefill chunks longer than this attend by query blocks over the keys their window reaches
        # (gale.attention); None keeps the dense masked path for every chunk (the benchmark's baseline).
        self.query_block: int | None = QUERY_BLOCK
        # Those chunks as one FlexAttention call per sequence instead of query blocks (compiled on a GPU; see
        # gale.attention and benchmarks/attention.py for when it pays)
        self.flex = False
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        meta: BatchMeta,
        cache: RollingCache | None,
        layer: int,
    ) -> torch.Tensor:
        n = x.shape[0]
        q = apply_rope(self.wq(x).view(n, self.n_heads, self.head_dim), rope)
        k = apply_rope(self.wk(x).view(n, self.n_kv_heads, self.head_dim), rope)
        v = self.wv(x).view(n, self.n_kv_heads, self.head_dim)
        return self.wo(self.attend(q, k, v, meta, cache, layer))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: BatchMeta, cache: RollingCache | None, layer: int
    ) -> torch.Tensor:
        """Attention proper: packed q `[N, heads, d]` and k/v `[N, kv_heads, d]` (rotated) -> `[N, heads * d]`,
        over this layer's cache, which it updates."""
        n = q.shape[0]
        if meta.decode:
            # One new token per sequence: store it, then attend over the buffer alone.
            cache.store(layer, meta, k, v)
            keys, values = cache.keys_values(layer, meta)
            if q.device.type == "cpu" and q.dtype == torch.float32:
                return decode_attention(q, keys, values, meta.mask).reshape(n, -1)
            out = F.scaled_dot_product_attention(q[:, :, None], keys, values, meta.mask, enable_gqa=True)
            return out.reshape(n, -1)

        if pays(meta, self.query_block):
            out = prefill_by_blocks(q, k, v, meta, cache, layer, self.window, self.query_block, self.flex)
            out = out.reshape(n, -1)
        else:
            keys, values = to_padded(k, meta), to_padded(v, meta)
            if meta.buffer_len:
                old_k, old_v = cache.keys_values(layer, meta)
                keys, values = torch.cat((old_k, keys), dim=2), torch.cat((old_v, values), dim=2)
            out = F.scaled_dot_product_attention(to_padded(q, meta), keys, values, meta.mask, enable_gqa=True)
            out = from_padded(out, meta)
        if cache is not None:
            cache.store(layer, meta, k, v)  # after attending: a chunk longer than the buffer overwrites itself
        return out


def to_padded(x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
    """Packed `[N, heads, d]` -> `[B, heads, Cmax, d]` (pad rows copy a real row; the mask hides them)."""
    if meta.gather is not None:
        x = x[meta.gather]
    return x.view(meta.batch_size, meta.max_len, *x.shape[1:]).transpose(1, 2)


def from_padded(x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
    """`[B, heads, Cmax, d]` -> packed `[N, heads * d]`, dropping pad rows."""
    x = x.transpose(1, 2).reshape(meta.batch_size * meta.max_len, -1)
    return x if meta.scatter is None else x[meta.scatter]


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, rope, meta, cache, layer):  # noqa: ANN001, ANN201 - same as Attention.forward
        h = x + self.attention(self.attention_norm(x), rope, meta, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each layer in backward: memory for fine-tuning
        self.decode_kernel: DecodeHook | None = None  # a decode step's layers in one call (see DecodeHook)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def hidden_states(self, tokens: torch.Tensor, meta: BatchMeta, cache: RollingCache | None) -> torch.Tensor:
        """Final-norm hidden states `[N, dim]` of packed tokens `[N]`."""
        if tokens.dim() != 1 or tokens.shape[0] != sum(meta.seqlens):
            n = sum(meta.seqlens)
            raise ValueError(f"tokens must be 1-D with sum(seqlens)={n} entries, got shape {tuple(tokens.shape)}")
        if (meta.buffer_len or meta.decode) and cache is None:
            raise ValueError("this plan reads a KV cache but none was given")
        h = self.tok_embeddings(tokens)
        if meta.decode and self.decode_kernel is not None:
            assert cache.window is None or cache.capacity <= cache.window, (
                f"the decode kernel ignores the window mask: capacity {cache.capacity} > window {cache.window}")
            if (fused := self.decode_kernel(h, meta, cache)) is not None:
                return fused
        rope = rope_rotations(meta.positions, self.args.head_dim, self.args.rope_theta)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            if recompute:
                h = torch.utils.checkpoint.checkpoint(layer, h, rope, meta, None, i, use_reentrant=False)
            else:
                h = layer(h, rope, meta, cache, i)
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.output is None:  # tied to the embedding
            return F.linear(h, self.tok_embeddings.weight).float()
        return self.output(h).float()

    def forward(
        self,
        tokens: torch.Tensor,
        meta: BatchMeta | None = None,
        cache: RollingCache | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """fp32 logits `[N, vocab]` for every new token, or `[B, vocab]` for each sequence's last one.

        Without `meta`, `tokens` is one fresh sequence attended in a single shot.
        """
        if meta is None:
            meta = plan([tokens.shape[0]], [0], self.args.sliding_window, device=tokens.device)
        h = self.hidden_states(tokens, meta, cache)
        if last_only and h.shape[0] != meta.batch_size:
            h = h[meta.last_index]
        return self.logits(h)
