"""Mistral 7B on one GPU: Gale against transformers and against the bandwidth limit, in one run.

    python benchmarks/gpu.py                         # H100/H200, about 5 minutes (every section has a limit)
    python benchmarks/gpu.py --quick                 # fewer tokens, no compiled decode: about 2 minutes
    python benchmarks/gpu.py --device cpu --tiny     # the same code paths on a 2-layer model (tests/test_gpu_bench.py)

A Mistral-7B-shaped model (dim 4096, 32 layers, 32/8 heads of 128, hidden 14336, vocab 32000, window 4096) of
random bf16 weights is made on the device itself (built on the meta device, then each tensor drawn in place: no
download, no host copy, no fp32 copy), and transformers' MistralForCausalLM is given the same tensors (shared
storage; only q/k are copied once, permuted from Mistral's interleaved RoPE pairs to HF's rotate-half rows).
Sections, each timed, limited (--budget shares the time out) and recorded, so one failing goes on to the next:

- bandwidth: a large device copy (bytes read + written / time) next to the GPU's spec sheet value.
- logits: a 1.5-window prompt (6144 tokens at W=4096) prefilled in window-sized chunks through the rolling
  buffer, then greedy decode, against HF bf16 and an fp32 HF reference (see `check_logits` for the tolerance).
- decode: batch-1 tok/s (Gale's model loop, Gale's engine, HF generate) against the roofline.
- throughput: batches of 16 and 64 through Gale's continuous-batching engine against HF generate.
- prefill: 16k tokens in window-sized chunks, sliding window against full attention (same weights).
- sdpa: which scaled_dot_product_attention backends take Gale's shapes (GQA + boolean window mask), and how fast.
- profile: kernels and host syncs of one decode step and one prefill chunk (what capture would remove).
- compile: the batch-1 decode step under torch.compile (mode="reduce-overhead": CUDA graphs) with static shapes
  (a full buffer), its ids and logits against eager on the same trajectory.

Writes gpu.json (after every section, so a run cut short keeps what it measured) and gpu.md to --out
(default $OUT if set, else ./gpu-results). Needs torch and transformers (>= 5); `gale` from src/ (PYTHONPATH=src
where it is not installed). The fp32 reference needs ~4 bytes per parameter on the device (29 GB for 7B).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # GPU images run it without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import NullTokenizer  # the sibling benchmark's textless tokenizer (cpu.py imports only the stdlib)

from gale.cache import RollingCache
from gale.config import ModelArgs, to_hf_config
from gale.engine import Engine
from gale.model import Transformer
from gale.sampling import SamplingParams

MISTRAL_7B = ModelArgs()  # the defaults are Mistral 7B v0.1's shapes, window 4096
TINY = ModelArgs(dim=256, n_layers=2, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2, vocab_size=1000,
                 sliding_window=16, max_seq_len=512)
# Spec-sheet HBM bandwidth (TB/s), matched in this order against torch.cuda.get_device_name().
SPEC_TBS = [("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100-SXM4-80GB", 2.039),
            ("A100 80GB PCIe", 1.935), ("A100", 1.555), ("L40S", 0.864), ("A10G", 0.6), ("L4", 0.3)]
GB = 1e9


@dataclass(frozen=True)
class Sizes:
    """How much work each section does."""

    prompt: int  # logits check: a prompt of 1.5 windows, so chunks roll the buffer
    greedy: int  # greedy tokens compared
    decode_prompt: int
    decode_tokens: int
    batches: tuple[int, ...]
    batch_prompt: int
    batch_tokens: int
    prefill: int
    copy_bytes: int
    compile_tokens: int


FULL = Sizes(prompt=6144, greedy=64, decode_prompt=512, decode_tokens=128, batches=(16, 64), batch_prompt=128,
             batch_tokens=128, prefill=16384, copy_bytes=4 << 30, compile_tokens=64)
QUICK = replace(FULL, decode_tokens=32, batch_tokens=32)
TINY_SIZES = Sizes(prompt=56, greedy=8, decode_prompt=8, decode_tokens=8, batches=(2, 4), batch_prompt=8,
                   batch_tokens=4, prefill=64, copy_bytes=16 << 20, compile_tokens=8)
LIMITS = {"bandwidth": 60, "logits": 180, "decode": 150, "throughput": 180, "prefill": 90, "sdpa": 60,
          "profile": 60, "compile": 300}  # seconds each, before --budget trims them


@dataclass
class Context:
    """What the sections share: the model, its HF twin, the sizes, and earlier sections' results."""

    model: Transformer
    hf: Any  # transformers' MistralForCausalLM on the same tensors
    device: torch.device
    sizes: Sizes
    compile_backend: str
    results: dict[str, Any]
    seed: int = 0

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def tokens(self, n: int, seed: int) -> torch.Tensor:
        """Random token ids (drawn on the host, the same on every device)."""
        g = torch.Generator().manual_seed(self.seed * 1000 + seed)
        return torch.randint(0, self.args.vocab_size, (n,), generator=g).to(self.device)


class SectionTimeout(BaseException):
    """A section ran past its limit (a BaseException, so the engine's per-sequence handlers do not take it)."""


# -- the models ------------------------------------------------------------------------------------------------
def build_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int) -> Transformer:
    """Random weights made on the device in `dtype`: built on the meta device, then each tensor drawn in place."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    g = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.uniform_(0.5, 1.5, generator=g)
        else:  # N(0, 0.02) as HF initialises; keeps the residual stream's scale over 32 layers
            p.normal_(0.0, 0.02, generator=g)
    return model


HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
HF_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}


def to_hf(name: str, t: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """(HF name, tensor in HF's rotate-half RoPE rows) of a Gale tensor: gale.weights.hf.to_hf without importing
    gale.weights (it needs `gguf`, which GPU images lack; tests/test_gpu_bench.py holds the two equal)."""
    if name in HF_TOP:
        return HF_TOP[name], t
    _, i, *module, leaf = name.split(".")
    module = ".".join(module)
    heads = {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads}.get(module)
    if heads:  # per head, pairs (x[2j], x[2j+1]) -> halves (x[j], x[j + d/2])
        t = t.reshape(heads, -1, 2, t.shape[1]).transpose(1, 2).reshape(t.shape)
    return f"model.layers.{i}.{HF_LAYER[module]}.{leaf}", t


def hf_twin(model: Transformer, dtype: torch.dtype) -> Any:
    """transformers' MistralForCausalLM holding Gale's tensors: the same storage where the dtype and layout agree
    (all but q/k at the model's dtype), else one copy made on the device."""
    from transformers import MistralConfig, MistralForCausalLM
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

    args = model.args
    cfg = MistralConfig(**to_hf_config(args), attn_implementation="sdpa")
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None  # generate runs to max_new_tokens
    with torch.device("meta"):
        hf = MistralForCausalLM(cfg)
    state = dict(to_hf(n, t, args) for n, t in model.state_dict().items())
    hf.load_state_dict({n: t.to(dtype) for n, t in state.items()}, strict=True, assign=True)
    hf.model.rotary_emb = MistralRotaryEmbedding(cfg).to(model.device)  # its inv_freq buffer was left on meta
    hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval().requires_grad_(False)


def own_bytes(hf: Any, model: Transformer) -> int:
    """Bytes of the HF twin's tensors that are not Gale's own storage (the permuted q/k)."""
    shared = {p.data_ptr() for p in model.parameters()}
    return sum(p.nbytes for p in hf.parameters() if p.data_ptr() not in shared)


def hf_generate(hf: Any, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuations `[B, new_tokens]` of equal-length prompts `[B, P]` (no EOS: always new_tokens)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=cfg)
    return out[:, prompts.shape[1]:]


# -- measuring ---------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> float:
    """Seconds `fn` takes on the device (synchronized before and after)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def prefill(model: Transformer, cache: RollingCache, tokens: torch.Tensor, chunk: int,
            last_only: bool = False) -> torch.Tensor:
    """Chunked prefill of one sequence in slot 0, as the engine's step budget cuts it: logits of every token
    (or of each chunk's last)."""
    out = [model(piece, cache.prepare([0], [len(piece)]), cache, last_only=last_only)
           for piece in tokens.split(chunk)]
    return torch.cat(out)


def greedy_steps(step: Callable[[torch.Tensor], torch.Tensor], first: torch.Tensor, n: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """n decode steps from token `first` (0-d): (tokens fed `[n]`, logits `[n, vocab]`); argmax on the device, so
    nothing waits for the host."""
    ids, rows, tok = [], [], first
    for _ in range(n):
        ids.append(tok)
        row = step(tok[None])[0].clone()  # clone: a CUDA graph's output is overwritten by its next replay
        rows.append(row)
        tok = row.argmax()
    return torch.stack(ids), torch.stack(rows)


def decode_step(model: Callable[..., torch.Tensor], cache: RollingCache) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda tok: model(tok, cache.prepare([0], [1]), cache)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def weight_bytes(model: Transformer) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bytes_per_token(model: Transformer, context: int) -> int:
    """Bytes a batch-1 decode step must read: every weight but the embedding table (one row of it) and the K/V
    of the `context` positions it attends."""
    a = model.args
    kv = 2 * a.n_layers * a.n_kv_heads * a.head_dim * model.dtype.itemsize * min(context, a.sliding_window or context)
    return weight_bytes(model) - model.tok_embeddings.weight.nbytes + kv


# -- sections ----------------------------------------------------------------------------------------------------
def section_bandwidth(ctx: Context) -> dict:
    """Device memory bandwidth from a large copy (bytes read + written), and the spec sheet's figure."""
    n = ctx.sizes.copy_bytes
    src = torch.ones(n, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    best = min(timed(ctx.device, lambda: dst.copy_(src)) for _ in range(10))
    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    spec = next((tbs for key, tbs in SPEC_TBS if key in name), None)
    return {"device_name": name, "copy_bytes": n, "measured_gbs": 2 * n / best / GB,
            "spec_gbs": spec * 1000 if spec else None}


def check_logits(ctx: Context) -> dict:
    """Gale's bf16 logits and greedy ids against transformers on the same weights.

    Tolerance: an fp32 copy of the HF model is the reference; HF's own bf16 logits are off it by `hf_max_err`
    (bf16 rounding over 32 layers; nothing is wrong with them). Gale passes when its logits are within
    2 x hf_max_err of the reference over every position (the prompt's chunks below and beyond the window, and
    every decode step): a bf16 implementation as exact as HF's. A RoPE-layout, window-mask or rolling-buffer bug
    lands well outside (q/k left in Mistral's row order: 5x the tolerance even on the tiny CPU model, whose
    near-uniform attention hides RoPE most; tests/test_gpu_bench.py).
    Near-ties: two tokens whose reference logits are within 2 x tolerance can swap under any bf16 implementation,
    so a greedy token other than the reference's argmax passes only at such a tie, and HF's greedy ids may leave
    Gale's only at one (after that the contexts differ).
    """
    model, sz = ctx.model, ctx.sizes
    prompt = ctx.tokens(sz.prompt, 1)
    cache = RollingCache(ctx.args, 1, device=ctx.device, dtype=ctx.dtype)
    pre = prefill(model, cache, prompt, ctx.args.sliding_window or sz.prompt)
    fed, rows = greedy_steps(decode_step(model, cache), pre[-1].argmax(), sz.greedy - 1)
    gale_ids = torch.cat((fed, rows[-1].argmax()[None]))  # the greedy tokens: those fed back, and the last
    gale = torch.cat((pre, rows))  # logits at positions 0 .. n + greedy - 2, i.e. of prompt + fed
    full = torch.cat((prompt, fed))[None]
    hf16 = ctx.hf(full, use_cache=False).logits[0].float()
    hf_ids = hf_generate(ctx.hf, prompt[None], sz.greedy)[0]
    ref = reference_logits(model, full)
    out = {**logit_errors(gale, hf16, ref, sz.prompt, ctx.args.sliding_window),
           **greedy_agreement(gale_ids, hf_ids, ref[sz.prompt - 1:], 2 * (ref - hf16).abs().max().item())}
    out["passed"] = out["logits_passed"] and out["greedy_passed"]
    return out


def reference_logits(model: Transformer, full: torch.Tensor) -> torch.Tensor:
    """fp32 logits of transformers' model on an fp32 copy of the weights (made on the device, freed after)."""
    ref_model = hf_twin(model, torch.float32)
    try:
        return ref_model(full, use_cache=False).logits[0].float()
    finally:
        del ref_model
        gc.collect()
        if model.device.type == "cuda":
            torch.cuda.empty_cache()


def logit_errors(gale: torch.Tensor, hf16: torch.Tensor, ref: torch.Tensor, n_prompt: int,
                 window: int | None) -> dict:
    """Errors against the fp32 reference, over all positions and per region (prompt within / beyond the window,
    decode steps), and the pass verdict."""
    regions = {"prompt_in_window": slice(0, min(window or n_prompt, n_prompt)),
               "prompt_beyond_window": slice(min(window or n_prompt, n_prompt), n_prompt),
               "decode": slice(n_prompt, None)}
    hf_err, gale_err = (hf16 - ref).abs(), (gale - ref).abs()
    tol = 2 * hf_err.max().item()
    out = {"positions": ref.shape[0], "ref_logit_std": ref.std().item(), "ref_logit_absmax": ref.abs().max().item(),
           "tolerance": tol, "hf_max_err": hf_err.max().item(), "gale_max_err": gale_err.max().item(),
           "hf_mean_err": hf_err.mean().item(), "gale_mean_err": gale_err.mean().item(),
           "gale_vs_hf_max": (gale - hf16).abs().max().item(),
           "top1_gale_vs_ref": (gale.argmax(-1) == ref.argmax(-1)).float().mean().item(),
           "top1_hf_vs_ref": (hf16.argmax(-1) == ref.argmax(-1)).float().mean().item()}
    for name, rows in regions.items():
        if rows.stop is None or rows.stop > rows.start:
            out[f"gale_max_err_{name}"] = gale_err[rows].max().item()
    out["logits_passed"] = out["gale_max_err"] <= tol
    return out


def greedy_agreement(gale_ids: torch.Tensor, hf_ids: torch.Tensor, ref_rows: torch.Tensor, tie: float) -> dict:
    """Greedy ids of Gale against the fp32 reference's argmax (teacher-forced on Gale's tokens) and against HF's
    own greedy generation; differences are allowed at near-ties only (reference margin <= `tie`)."""
    margin = ref_rows.max(-1).values - ref_rows.gather(1, gale_ids[:, None])[:, 0]
    not_argmax = (margin > 0).nonzero()[:, 0].tolist()
    differ = (gale_ids != hf_ids).nonzero()[:, 0].tolist()
    first = differ[0] if differ else None
    hf_tie = first is None or abs(ref_rows[first, gale_ids[first]] - ref_rows[first, hf_ids[first]]).item() <= tie
    out = {"greedy_tokens": len(gale_ids), "tie_margin": tie, "gale_not_ref_argmax_at": not_argmax,
           "gale_max_margin": margin.max().item(), "hf_identical_tokens": len(gale_ids) - len(differ),
           "hf_first_divergence": first, "hf_divergence_at_tie": hf_tie}
    out["greedy_passed"] = margin.max().item() <= tie and hf_tie
    return out


def gale_loop_tps(ctx: Context, prompt: torch.Tensor, n: int) -> float:
    """Batch-1 decode tok/s of Gale's model driven directly (plan, forward, argmax on the device)."""
    cache = RollingCache(ctx.args, 1, device=ctx.device, dtype=ctx.dtype)
    first = prefill(ctx.model, cache, prompt, len(prompt), last_only=True)[-1].argmax()
    step = decode_step(ctx.model, cache)
    greedy_steps(step, first, 2)  # warm-up
    return n / timed(ctx.device, lambda: greedy_steps(step, first, n))


def engine_run(ctx: Context, prompts: list[list[int]], new_tokens: int) -> dict:
    """Prompts through Gale's continuous-batching engine (prefix cache off): total and decode-phase tok/s, and
    the ids (`ids`, left out of the report)."""
    engine = Engine(ctx.model, NullTokenizer(), max_seqs=len(prompts), prefix_cache_tokens=0, kv_dtype=ctx.dtype)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    seqs = [engine.add(p, params) for p in prompts]
    sync(ctx.device)
    t0 = time.perf_counter()
    while not all(s.output or s.finished for s in seqs):
        engine.step()
    t1 = time.perf_counter()  # every sequence has its first token (each step ends reading the sampled ids)
    while engine.has_work:
        engine.step()
    t2 = time.perf_counter()
    if failed := [s.error for s in seqs if s.error]:
        raise RuntimeError(f"engine sequences failed: {failed[0]}")
    made = sum(len(s.output) for s in seqs)
    return {"tok_s": made / (t2 - t0), "prefill_s": t1 - t0,
            "decode_tok_s": (made - len(seqs)) / (t2 - t1) if t2 > t1 else None, "ids": [s.output for s in seqs]}


def hf_run(ctx: Context, prompts: torch.Tensor, new_tokens: int) -> dict:
    """HF generate on the same prompts: total tok/s, and decode-phase tok/s from t(new_tokens) - t(1)."""
    hf_generate(ctx.hf, prompts, 2)  # warm-up
    one = timed(ctx.device, lambda: hf_generate(ctx.hf, prompts, 1))
    ids = []
    total = timed(ctx.device, lambda: ids.append(hf_generate(ctx.hf, prompts, new_tokens)))
    b = prompts.shape[0]
    return {"tok_s": b * new_tokens / total, "prefill_s": one,
            "decode_tok_s": b * (new_tokens - 1) / (total - one) if total > one else None, "ids": ids[0].tolist()}


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def section_decode(ctx: Context) -> dict:
    """Batch-1 decode against the roofline: bytes read per token / the measured (and the spec) bandwidth."""
    sz = ctx.sizes
    prompt = ctx.tokens(sz.decode_prompt, 2)
    ids = prompt.tolist()
    loop = gale_loop_tps(ctx, prompt, sz.decode_tokens)
    engine_run(ctx, [ids], 2)  # warm-up
    engine = engine_run(ctx, [ids], sz.decode_tokens)
    hf = hf_run(ctx, prompt[None], sz.decode_tokens)
    same = common_prefix(engine["ids"][0], hf["ids"][0])
    out = {"prompt": sz.decode_prompt, "tokens": sz.decode_tokens, "gale_loop_tok_s": loop,
           "gale_engine_tok_s": engine["decode_tok_s"], "hf_generate_tok_s": hf["decode_tok_s"],
           "same_ids_as_hf_prefix": same, **roofline(ctx, sz.decode_prompt + sz.decode_tokens // 2, loop)}
    if bound := out.get("roofline_tok_s_measured"):  # the engine adds sampling, bookkeeping and a sync per step
        out["engine_fraction_of_roofline_measured"] = ratio(engine["decode_tok_s"], bound)
    return out


def roofline(ctx: Context, context: int, tok_s: float | None) -> dict:
    """tok/s the bandwidth allows at batch 1 and the fraction `tok_s` reaches, for the measured and spec values."""
    per_token = bytes_per_token(ctx.model, context)
    out = {"bytes_per_token_gb": per_token / GB}
    bw = ctx.results.get("bandwidth", {}).get("result", {})
    for kind in ("measured", "spec"):
        if gbs := bw.get(f"{kind}_gbs"):
            out[f"roofline_tok_s_{kind}"] = gbs * GB / per_token
            out[f"fraction_of_roofline_{kind}"] = tok_s / out[f"roofline_tok_s_{kind}"] if tok_s else None
    return out


def section_throughput(ctx: Context) -> dict:
    """Batches of equal-length prompts: Gale's engine against HF generate, same prompts and token counts."""
    sz, out = ctx.sizes, {}
    for b in sz.batches:
        prompts = torch.stack([ctx.tokens(sz.batch_prompt, 100 + i) for i in range(b)])
        lists = prompts.tolist()
        engine_run(ctx, lists, 2)  # warm-up at this batch size
        gale = engine_run(ctx, lists, sz.batch_tokens)
        hf = hf_run(ctx, prompts, sz.batch_tokens)
        same = [common_prefix(g, h) for g, h in zip(gale.pop("ids"), hf.pop("ids"))]  # bf16 near-ties end them
        out[f"b{b}"] = {"gale": gale, "hf": hf, "gale_over_hf": gale["tok_s"] / hf["tok_s"],
                        "gale_over_hf_decode": ratio(gale["decode_tok_s"], hf["decode_tok_s"]),
                        "same_ids_as_hf_mean_prefix": sum(same) / len(same)}
    out["prompt"], out["new_tokens"] = sz.batch_prompt, sz.batch_tokens
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def same_weights(model: Transformer, args: ModelArgs) -> Transformer:
    """A model built for `args` holding `model`'s tensors (no copy): built whole, so every module reads the new
    args (the attention keeps its own window), not just `model.args`."""
    with torch.device("meta"):
        twin = Transformer(args).to(model.dtype)
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    if meta := [n for n, t in twin.named_buffers() if t.is_meta]:
        raise RuntimeError(f"buffers left on the meta device: {meta}")
    return twin.eval().requires_grad_(False)


def section_prefill(ctx: Context) -> dict:
    """A long prompt in window-sized chunks (the engine's step budget), sliding window against full attention
    (the same tensors in a model without a window); the last logits' difference shows the window took effect."""
    n, chunk = ctx.sizes.prefill, ctx.args.sliding_window or 4096
    tokens, out, last = ctx.tokens(n, 3), {"tokens": n, "chunk": chunk}, {}
    full = same_weights(ctx.model, replace(ctx.args, sliding_window=None, max_seq_len=max(ctx.args.max_seq_len, n)))
    for name, model in (("swa", ctx.model), ("full", full)):
        def run(model: Transformer = model, name: str = name) -> RollingCache:
            cache = RollingCache(model.args, 1, device=ctx.device, dtype=ctx.dtype)
            last[name] = prefill(model, cache, tokens, chunk, last_only=True)[-1]
            return cache

        cache = run()  # warm-up, and the cache's size
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        seconds = timed(ctx.device, run)
        out[name] = {"seconds": seconds, "tok_s": n / seconds, "kv_cache_gb": cache.nbytes / GB,
                     "peak_memory_gb": peak_gb(ctx.device)}
    out["full_over_swa"] = out["full"]["seconds"] / out["swa"]["seconds"]
    out["last_logits_max_diff"] = (last["full"] - last["swa"]).abs().max().item()
    return out


def section_sdpa(ctx: Context) -> dict:
    """Each SDPA backend on Gale's attention shapes (GQA; the plan's boolean window mask, the float band mask of
    gale.attention's query blocks, or none): ms per call, or its refusal."""
    from torch.nn.attention import SDPBackend

    a, w, dt = ctx.args, ctx.args.sliding_window or 4096, ctx.dtype
    # queries, keys, mask: one token over a full buffer (with the plan's mask, and without: it is all True then),
    # a window-sized chunk over [buffer ; chunk] with the window's band (boolean, and as a float additive mask)
    shapes = {"decode_b1": (1, w, "bool"), "decode_b1_nomask": (1, w, None), "chunk": (w, 2 * w, "bool"),
              "chunk_float_mask": (w, 2 * w, "float")}
    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    backends = {"default": None, **{n.lower(): getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)}}
    out = {}
    for shape, (nq, nk, kind) in shapes.items():
        q = torch.randn(1, a.n_heads, nq, a.head_dim, device=ctx.device, dtype=dt)
        k, v = (torch.randn(1, a.n_kv_heads, nk, a.head_dim, device=ctx.device, dtype=dt) for _ in range(2))
        qpos, kpos = torch.arange(nk - nq, nk, device=ctx.device)[:, None], torch.arange(nk, device=ctx.device)
        mask = ((kpos <= qpos) & (kpos > qpos - w))[None, None]
        if kind == "float":
            mask = torch.zeros(mask.shape, device=ctx.device, dtype=dt).masked_fill(~mask, float("-inf"))
        for name, backend in backends.items():
            out[f"{shape}/{name}"] = sdpa_time(ctx.device, q, k, v, mask if kind else None, backend)
    return out


def sdpa_time(device: torch.device, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              backend: Any) -> float | str:
    """ms per SDPA call under one backend (median of 5 after a warm-up), or why it refused (torch says why in
    warnings; the error itself only says that no backend was left)."""
    import warnings

    from torch.nn.attention import sdpa_kernel

    def call() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(backend) if backend is not None else nullcontext():
                call()
                times = sorted(timed(device, call) for _ in range(5))
        except Exception as e:  # noqa: BLE001 - a backend refusing these shapes is the finding
            why = [str(w.message).strip().splitlines()[0][:160] for w in caught] or [str(e).strip()[:160]]
            return f"refused: {type(e).__name__}: {' / '.join(dict.fromkeys(why))}"
    return times[2] * 1e3


def section_profile(ctx: Context) -> dict:
    """What one decode step and one prefill chunk cost on the host: kernels launched, host syncs (CUDA's sync debug
    mode), and the top operators, i.e. what capturing the step would remove."""
    from torch.profiler import ProfilerActivity, profile

    w = ctx.args.sliding_window or 256
    cache = RollingCache(ctx.args, 1, device=ctx.device, dtype=ctx.dtype)
    prompt = ctx.tokens(w + 1, 4)
    first = prefill(ctx.model, cache, prompt, w, last_only=True)[-1].argmax()
    step = decode_step(ctx.model, cache)
    chunk = ctx.tokens(w, 5)
    steps = {"decode_step": lambda: step(first[None]),
             "prefill_chunk": lambda: ctx.model(chunk, cache.prepare([0], [w]), cache, last_only=True)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    out = {}
    for name, fn in steps.items():
        fn()  # warm-up
        with profile(activities=activities) as prof:
            fn()
            sync(ctx.device)
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
        sort = "device_time_total" if ctx.device.type == "cuda" else "cpu_time_total"
        busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3
        out[name] = {"wall_ms": timed(ctx.device, fn) * 1e3, "cuda_kernels": kernels if kernels else None,
                     "kernel_ms": busy if kernels else None,  # << wall_ms: the host is the bottleneck
                     "host_syncs": host_syncs(ctx.device, fn), "top": events.table(sort_by=sort, row_limit=12)}
    return out


def host_syncs(device: torch.device, fn: Callable[[], Any]) -> list[str] | None:
    """Where `fn` makes the host wait for the GPU (torch.cuda.set_sync_debug_mode's warnings), deduplicated."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted({f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught})


def section_compile(ctx: Context) -> dict:
    """The batch-1 decode step compiled (CUDA graphs with the inductor backend), shapes static because the buffer
    is full (a prompt longer than the window): ids and logits against eager on the same trajectory, and tok/s."""
    a = ctx.args
    prompt = ctx.tokens((a.sliding_window or 512) + 8, 6)
    caches = [RollingCache(a, 1, device=ctx.device, dtype=ctx.dtype) for _ in range(2)]
    firsts = [prefill(ctx.model, c, prompt, len(prompt), last_only=True)[-1].argmax() for c in caches]
    for t in caches[1].k + caches[1].v:  # the buffers the graph writes keep their addresses: no copies per replay
        torch._dynamo.mark_static_address(t)
    mode = {"mode": "reduce-overhead"} if ctx.compile_backend == "inductor" else {}
    compiled = torch.compile(ctx.model, backend=ctx.compile_backend, dynamic=False, **mode)
    torch._logging.set_logs(perf_hints=True, graph_breaks=True, recompiles=True)  # why a graph is skipped: stderr
    try:
        out = compare_compiled(ctx, compiled, caches, firsts)
    finally:
        torch._logging.set_logs()
    from torch._dynamo.utils import counters

    return {"backend": ctx.compile_backend, **mode, **out, "graph_breaks": dict(counters["graph_break"]),
            "inductor": {k: v for k, v in counters["inductor"].items() if "cudagraph" in k or "skip" in k},
            **roofline(ctx, len(prompt), out["compiled_tok_s"])}


def compare_compiled(ctx: Context, compiled: Callable[..., torch.Tensor], caches: list[RollingCache],
                     firsts: list[torch.Tensor]) -> dict:
    """Greedy decode from the same prefilled state, eager on caches[0] and compiled on caches[1]: the first 3
    compiled steps compile and record the graph, the rest are timed."""
    n = ctx.sizes.compile_tokens
    eager = []
    eager_s = timed(ctx.device, lambda: eager.append(greedy_steps(decode_step(ctx.model, caches[0]), firsts[0], n)))
    (eager_ids, eager_rows), compiled_step = eager[0], decode_step(compiled, caches[1])
    t0 = time.perf_counter()
    warm_ids, warm_rows = greedy_steps(compiled_step, firsts[1], 3)  # compiles, then records the graph
    compile_s = time.perf_counter() - t0
    rest = []
    seconds = timed(ctx.device, lambda: rest.append(greedy_steps(compiled_step, warm_rows[-1].argmax(), n - 3)))
    ids, rows = torch.cat((warm_ids, rest[0][0])), torch.cat((warm_rows, rest[0][1]))
    return {"tokens": n, "compile_s": compile_s, "eager_tok_s": n / eager_s, "compiled_tok_s": (n - 3) / seconds,
            "identical_ids": int((ids == eager_ids).sum()), "max_logit_diff": (rows - eager_rows).abs().max().item()}


SECTIONS: dict[str, Callable[[Context], dict]] = {
    "bandwidth": section_bandwidth, "logits": check_logits, "decode": section_decode,
    "throughput": section_throughput, "prefill": section_prefill, "sdpa": section_sdpa,
    "profile": section_profile, "compile": section_compile}  # compile last: a broken capture cannot spoil the rest


# -- running and reporting ----------------------------------------------------------------------------------------
@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread after `seconds` (GPU calls return quickly: the check lands)."""
    def fire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"ran past its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_section(name: str, ctx: Context, limit: float) -> dict:
    """One section under its time limit: its result, or its error; always its seconds and peak memory."""
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t0 = time.perf_counter()
    try:
        with time_limit(limit):
            entry = {"ok": True, "result": SECTIONS[name](ctx)}
    except (Exception, SectionTimeout) as e:  # noqa: BLE001 - recorded; the next section runs
        entry = {"ok": False, "error": f"{type(e).__name__}: {e}",
                 "traceback": traceback.format_exc(limit=-6)[-3000:]}
    entry.update(seconds=time.perf_counter() - t0, limit_s=limit, peak_memory_gb=peak_gb(ctx.device))
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return entry


def headline(results: dict) -> list[tuple[str, str, str]]:
    """(what, value, target) rows of the figures the issue asks for."""
    def get(section: str, *path: str) -> Any:
        node = results.get(section, {}).get("result", {})
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        return node if node != {} else None

    rows = [("logits within tolerance (max err Gale / HF vs fp32)",
             f"{get('logits', 'logits_passed')} ({fmt(get('logits', 'gale_max_err'))} / "
             f"{fmt(get('logits', 'hf_max_err'))})", "<= 2 x HF's"),
            ("greedy ids (identical to HF generate, of)",
             f"{get('logits', 'greedy_passed')} ({get('logits', 'hf_identical_tokens')} of "
             f"{get('logits', 'greedy_tokens')})", "same, or a near-tie"),
            ("decode B=1 tok/s (Gale loop / engine / HF)",
             " / ".join(fmt(get("decode", k)) for k in ("gale_loop_tok_s", "gale_engine_tok_s", "hf_generate_tok_s")),
             ""),
            ("decode B=1 fraction of roofline (loop: measured bw / spec bw; engine: measured bw)",
             f"{fmt(get('decode', 'fraction_of_roofline_measured'))} / "
             f"{fmt(get('decode', 'fraction_of_roofline_spec'))}; "
             f"{fmt(get('decode', 'engine_fraction_of_roofline_measured'))}", ">= 0.75"),
            ("compiled decode B=1 tok/s (fraction of roofline)",
             f"{fmt(get('compile', 'compiled_tok_s'))} ({fmt(get('compile', 'fraction_of_roofline_measured'))})", ""),
            ("prefill full / SWA time", fmt(get("prefill", "full_over_swa")), ""),
            ("peak memory allocated, GB (the largest section's)",
             fmt(max((e["peak_memory_gb"] for e in results.values() if e.get("peak_memory_gb")), default=None)), "")]
    for key in sorted(k for k in results.get("throughput", {}).get("result", {}) if k.startswith("b")):
        rows.append((f"{key.upper()} tok/s Gale / HF (ratio)", f"{fmt(get('throughput', key, 'gale', 'tok_s'))} / "
                     f"{fmt(get('throughput', key, 'hf', 'tok_s'))} ({fmt(get('throughput', key, 'gale_over_hf'))})",
                     ">= 5x at B=64" if key == "b64" else ""))
    return rows


def fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return "n/a" if x is None else str(x)


def flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, node


def markdown(report: dict, every_metric: bool = True) -> str:
    """The headline table, the sections' status, then every section's scalars (profiles' operator tables stay
    in the JSON)."""
    lines = [f"# Gale on {report['meta']['device_name']}", "", f"{report['meta']['summary']}", "",
             "| what | value | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in headline(report["sections"])]
    lines += ["", "| section | status | seconds | peak GB |", "|---|---|---|---|"]
    for name, entry in report["sections"].items():
        status = "ok" if entry["ok"] else entry["error"].replace("|", "/")[:160]
        lines.append(f"| {name} | {status} | {fmt(entry['seconds'])} | {fmt(entry['peak_memory_gb'])} |")
    if not every_metric:
        return "\n".join(lines) + "\n"
    lines += ["", "| section | metric | value |", "|---|---|---|"]
    for name, entry in report["sections"].items():
        for key, value in flatten(entry.get("result", {})):
            if not key.endswith(".top"):
                lines.append(f"| {name} | {key} | {fmt(value).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu.md").write_text(markdown(report))


def summary(results: dict, seconds: float) -> str:
    failed = [n for n, e in results.items() if not e["ok"]]
    passed = results.get("logits", {}).get("result", {}).get("passed")
    peaks = [e["peak_memory_gb"] for e in results.values() if e.get("peak_memory_gb") is not None]
    return (f"{len(results) - len(failed)} of {len(results)} sections ran"
            f"{' (not: ' + ', '.join(failed) + ')' if failed else ''}; logits and greedy check passed: {passed}; "
            f"{seconds:.0f} s in all; peak memory {fmt(max(peaks, default=None))} GB allocated (a section's most)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="2 layers, dim 256, window 16: the CPU test's model")
    p.add_argument("--quick", action="store_true", help="fewer decode tokens, no compiled decode (about 2 minutes)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-results"),
                   help="folder for gpu.json and gpu.md ($OUT when set)")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=None, help="default: all")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: trace only)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled decode section")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all sections together")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def describe(ctx: Context, setup_s: float) -> dict:
    """The run's circumstances: device, versions, shapes, sizes, weights."""
    import transformers

    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    return {"device_name": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "args": ctx.args.to_dict(), "sizes": asdict(ctx.sizes), "weights_gb": weight_bytes(ctx.model) / GB,
            "hf_own_gb": own_bytes(ctx.hf, ctx.model) / GB, "setup_s": setup_s,
            "fp32_matmul_precision": torch.get_float32_matmul_precision(), "summary": "running"}


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    device, t_start = torch.device(a.device), time.perf_counter()
    sizes = TINY_SIZES if a.tiny else QUICK if a.quick else FULL
    names = a.sections or [s for s in SECTIONS if s != "compile" or not (a.quick or a.no_compile)]
    torch.manual_seed(a.seed)
    with torch.no_grad():
        model = build_model(TINY if a.tiny else MISTRAL_7B, device, torch.bfloat16, a.seed)
        ctx = Context(model, hf_twin(model, model.dtype), device, sizes, a.compile_backend, {}, a.seed)
        report = {"meta": describe(ctx, time.perf_counter() - t_start), "sections": ctx.results}
        for section in names:
            limit = min(LIMITS[section], a.budget - (time.perf_counter() - t_start))
            if limit < 5:
                ctx.results[section] = {"ok": False, "error": "skipped: --budget spent", "seconds": 0.0,
                                        "peak_memory_gb": None}
            else:
                print(f"gpu.py: {section} (limit {limit:.0f} s) ...", file=sys.stderr, flush=True)
                ctx.results[section] = run_section(section, ctx, limit)
            write(report, a.out)
    report["meta"]["summary"] = summary(ctx.results, time.perf_counter() - t_start)
    report["meta"]["total_s"] = time.perf_counter() - t_start
    write(report, a.out)
    print(markdown(report, every_metric=False))  # the last of the output a short tail shows; the rest in gpu.md
    return report


if __name__ == "__main__":
    main()
