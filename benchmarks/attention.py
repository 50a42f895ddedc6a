"""Sliding-window attention (W=4096, rolling cache) vs full attention at 16k tokens: prefill, decode, memory.

The paper's 2x at 16k comes from kernels that compute only the scores a window lets a query see. Gale's
prefill does that by query blocks (gale.attention); the dense masked path it replaced is measured next to it
("dense": every chunk over [buffer ; chunk]), and full attention (window None, same weights) runs the same
code. Each row prints the attention FLOPs the path actually computed (4 * head_dim per query-key score and
head) and the ideal ratio (scores inside the window only).

* attention-only rows: attention alone (`Attention.attend`: the rolling cache's reads and writes, no
  projections; 8 query / 2 KV heads of 128 by default), prefill chunks of W/4, W/2, W and 2W; the chunk-W rows
  run each in a fresh process, so their peak RSS is their own.
* whole-model rows: a Mistral-shaped model (32 query / 8 KV heads of 128 and dim 4096, as Mistral 7B; 2
  layers instead of 32, an FFN of 1024 instead of 14336, 1000-token vocabulary, random fp32 weights; on a GPU
  `--model-layers 32 --model-hidden 14336` is Mistral 7B's shape, in bf16)
  prefilling in chunks of W, then decoding; `--model-tokens 16384 32768` adds 32k. Its linear layers cost the
  same in both (printed), so the model's ideal ratio is below attention's: (linear + full) / (linear + SWA).

* FlexAttention rows (`--flex`, default on a GPU): the same chunks as one compiled FlexAttention call per
  sequence under a sliding-window BlockMask (gale.attention.flex_window_attention); its FLOPs count whole
  128 x 128 tiles. A path that fails (no Triton, say) is reported on stderr and left out.

    python benchmarks/attention.py [--tokens 16384 --window 4096 --model-tokens 16384 32768 --threads 2]
    python benchmarks/attention.py --quick      # small sizes
    python benchmarks/attention.py --device cuda --heads 32 --kv-heads 8 --model-layers 32 --model-hidden 14336 \
        --model-tokens 16384 32768              # one GPU, bf16, Mistral 7B's shape
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # GPU images run it without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import sync  # the sibling GPU benchmark's

from gale.attention import QUERY_BLOCK, scores_computed
from gale.cache import RollingCache
from gale.config import ModelArgs
from gale.model import Attention, Transformer

PATHS = {"full": (False, True, False), "full dense": (False, False, False), "SWA": (True, True, False),
         "SWA dense": (True, False, False)}  # label -> (windowed, by query blocks (else dense), FlexAttention)
FLEX_PATHS = {"full flex": (False, True, True), "SWA flex": (True, True, True)}


def clock(device: torch.device) -> float:
    """perf_counter once the device's queued work is done (GPU kernels run asynchronously)."""
    sync(device)
    return time.perf_counter()


def peak_mb(device: torch.device) -> float:
    """Peak memory in MB: the GPU's allocated peak since the last reset, or this process's peak RSS (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def ideal_scores(tokens: int, window: int | None) -> int:
    """Query-key scores per head inside the window (causal): query i sees min(i + 1, W) keys."""
    if window is None or window >= tokens:
        return tokens * (tokens + 1) // 2
    return window * (window + 1) // 2 + (tokens - window) * window


def layer_args(a: argparse.Namespace, window: int | None) -> ModelArgs:
    return ModelArgs(dim=256, n_layers=1, head_dim=a.head_dim, hidden_dim=256, n_heads=a.heads,
                     n_kv_heads=a.kv_heads, vocab_size=16, max_seq_len=a.tokens + a.decode_steps + 1,
                     sliding_window=window)


def attention_run(a: argparse.Namespace, path: str, chunk: int) -> dict[str, float]:
    """Chunked prefill of `a.tokens` then `a.decode_steps` decode steps through attention alone
    (`Attention.attend`: the cache's reads and writes included, no projections), which is what the FLOP count
    counts. Each step's random rotated q/k/v are drawn untimed, a step at a time, so the peak memory is attention's."""
    windowed, blocked, flex = {**PATHS, **FLEX_PATHS}[path]
    block = a.query_block if blocked else None
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    args = layer_args(a, a.window if windowed else None)
    attn = Attention(args).eval()
    attn.query_block, attn.flex = block, flex
    cache = RollingCache(args, 1, device=dev, dtype=dt)
    gen = torch.Generator(dev).manual_seed(0)
    tiled = dev.type == "cpu" and dt == torch.float32

    def step(n: int) -> tuple[float, int]:
        """One forward of n new tokens: its seconds and the scores it computed per head."""
        q = torch.randn(n, args.n_heads, args.head_dim, generator=gen, device=dev, dtype=dt)
        k, v = (torch.randn(n, args.n_kv_heads, args.head_dim, generator=gen, device=dev, dtype=dt) for _ in "kv")
        t0 = clock(dev)
        meta = cache.prepare([0], [n])
        attn.attend(q, k, v, meta, cache, 0)
        return clock(dev) - t0, scores_computed(meta, args.sliding_window, block, tiled, flex)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode():
        prefill, scores = map(sum, zip(*(step(min(chunk, a.tokens - i)) for i in range(0, a.tokens, chunk))))
        step(1)  # warm-up, untimed
        decode = sum(step(1)[0] for _ in range(a.decode_steps)) / a.decode_steps
    return {"prefill_s": prefill, "decode_ms": decode * 1e3, "cache_mib": cache.nbytes / 2**20,
            "gflop": 4 * args.head_dim * args.n_heads * scores / 1e9, "peak_mb": peak_mb(dev)}


def interleaved(run: Callable[[str], dict[str, float]], paths: Iterable[str], repeats: int) -> dict[str, dict]:
    """`run(path)` for every path, `repeats` rounds in turn (so a slow minute of a shared VM hits every path),
    keeping each path's fastest times and its highest peak memory. A path that fails is reported and dropped
    (FlexAttention may not compile on every install)."""
    paths = list(paths)
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    for _ in range(repeats):
        for p in [p for p in paths if p in runs]:
            try:
                runs[p].append(run(p))
            except Exception as e:  # noqa: BLE001 - the other paths' rows still print
                print(f"{p}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", file=sys.stderr)
                del runs[p]
    best = {}
    for p, rs in runs.items():
        best[p] = {k: (max if k == "peak_mb" else min)(r[k] for r in rs) for k in rs[0]}
    return best


def in_child(a: argparse.Namespace, path: str, chunk: int) -> dict[str, float]:
    """attention_run in a fresh process, so that its peak RSS is that path's alone."""
    cmd = [sys.executable, __file__, "--child", json.dumps({"path": path, "chunk": chunk, "args": vars(a)})]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def attention_table(a: argparse.Namespace) -> None:
    ideal = ideal_scores(a.tokens, None) / ideal_scores(a.tokens, a.window)
    on_gpu = a.device.startswith("cuda")
    memory = "peak GPU MB" if on_gpu else "peak RSS MB"
    print(f"\nattention alone (Attention.attend, no projections): {a.heads} query / {a.kv_heads} KV heads of "
          f"{a.head_dim}, {a.tokens} tokens, W={a.window}, query blocks of {a.query_block}, {describe(a)}; ideal "
          f"FLOP ratio full / SWA {ideal:.2f}x")
    print(f"| chunk | path | prefill s | full / this (time) | attention GFLOP | full / this (FLOPs) | {memory} |")
    print("|---|---|---|---|---|---|---|")
    decode, paths = {}, {**PATHS, **FLEX_PATHS} if a.flex else PATHS
    for chunk in sorted({max(1, a.window // 4), max(1, a.window // 2), a.window, 2 * a.window}):
        fresh = chunk == a.window  # CPU: a fresh process, so the peak RSS is the row's own; GPU: reset per run
        run = in_child if fresh and not on_gpu else attention_run
        rows = interleaved(functools.partial(run, a, chunk=chunk), paths, a.repeats)
        for p, r in rows.items():
            peak = f"{r['peak_mb']:.0f}" if fresh or on_gpu else "-"
            print(f"| {chunk} | {p} | {r['prefill_s']:.3f} | {rows['full']['prefill_s'] / r['prefill_s']:.2f}x | "
                  f"{r['gflop']:.1f} | {rows['full']['gflop'] / r['gflop']:.2f}x | {peak} |", flush=True)
        if fresh:
            decode = rows
    print(f"\n| one layer at {a.tokens} | full attention | SWA W={a.window} | full / SWA |\n|---|---|---|---|")
    for key, label in (("decode_ms", "decode (ms/token)"), ("cache_mib", "KV cache (MiB)")):
        full, swa = decode["full"][key], decode["SWA"][key]
        print(f"| {label} | {full:.3f} | {swa:.3f} | {full / swa:.2f}x |")


def describe(a: argparse.Namespace) -> str:
    if a.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(a.device)}, {a.dtype}, torch {torch.__version__}"
    return f"{a.dtype}, {torch.get_num_threads()} threads"


def mistral_shaped(a: argparse.Namespace, tokens: int, window: int | None) -> ModelArgs:
    return ModelArgs(dim=a.model_dim, n_layers=a.model_layers, head_dim=128, hidden_dim=a.model_hidden, n_heads=32,
                     n_kv_heads=8, vocab_size=1000, max_seq_len=tokens + a.decode_steps, sliding_window=window)


def model_run(model: Transformer, block: int | None, flex: bool, tokens: int, chunk: int, steps: int
              ) -> dict[str, float]:
    """Chunked prefill of `tokens` random ids (last logits only), then `steps` decode steps."""
    for layer in model.layers:
        layer.attention.query_block, layer.attention.flex = block, flex
    args, dev = model.args, model.device
    cache = RollingCache(args, 1, device=dev, dtype=model.dtype)
    ids = torch.randint(0, args.vocab_size, (tokens + steps,), generator=torch.Generator().manual_seed(0)).to(dev)
    tiled, scores = dev.type == "cpu" and model.dtype == torch.float32, 0
    with torch.inference_mode():
        t0 = clock(dev)
        for i in range(0, tokens, chunk):
            meta = cache.prepare([0], [min(chunk, tokens - i)])
            scores += scores_computed(meta, args.sliding_window, block, tiled, flex)
            model(ids[i : min(i + chunk, tokens)], meta, cache, last_only=True)
        prefill = clock(dev) - t0
        t0 = clock(dev)
        for t in range(tokens, tokens + steps):
            model(ids[t : t + 1], cache.prepare([0], [1]), cache)
        decode = (clock(dev) - t0) / steps
    gflop = 4 * args.head_dim * args.n_heads * args.n_layers * scores / 1e9
    return {"prefill_s": prefill, "decode_ms": decode * 1e3, "attn_gflop": gflop}


def model_table(a: argparse.Namespace) -> None:
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    probe = mistral_shaped(a, 1, a.window)
    with torch.device("meta"):  # then drawn in place on the device: no fp32 copy of a 7B model
        swa = Transformer(probe).to(dt)
    swa = swa.to_empty(device=dev).eval()
    g = torch.Generator(dev).manual_seed(0)
    for name, t in swa.named_parameters():  # N(0, 0.02) as HF initialises, norms near 1
        t.requires_grad_(False)
        t.uniform_(0.5, 1.5, generator=g) if name.endswith("norm.weight") else t.normal_(0.0, 0.02, generator=g)
    linear = sum(p.numel() for n, p in swa.named_parameters() if n.startswith("layers.") and p.dim() == 2)
    print(f"\nwhole model: dim {a.model_dim}, 32 query / 8 KV heads of 128 (Mistral 7B's), {a.model_layers} layers, "
          f"FFN {a.model_hidden}, vocab 1000, random weights, prefill chunks of W={a.window}, {describe(a)}")
    print("| tokens | path | prefill s | full / this | attention GFLOP | + linear GFLOP | ideal ratio: attention, "
          "model | decode ms/token | full / this |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tokens in a.model_tokens:
        with torch.device("meta"):  # the same weights, shared: no second copy
            full = Transformer(mistral_shaped(a, tokens, None)).to(dt)
        full.load_state_dict(swa.state_dict(), assign=True)
        full.eval()
        swa.args = mistral_shaped(a, tokens, a.window)
        qb = a.query_block
        paths = {"full": (full, qb, False), "SWA": (swa, qb, False), "SWA dense": (swa, None, False)}
        if a.flex:
            paths |= {"full flex": (full, qb, True), "SWA flex": (swa, qb, True)}
        runs = interleaved(lambda p, paths=paths, tokens=tokens: model_run(*paths[p], tokens, a.window, a.decode_steps),
                           paths, a.repeats)
        lin = 2 * linear * tokens / 1e9
        per_score = 4 * 128 * 32 * a.model_layers / 1e9
        full_ideal, swa_ideal = (per_score * ideal_scores(tokens, w) for w in (None, a.window))
        ideal = f"{full_ideal / swa_ideal:.2f}x, {(lin + full_ideal) / (lin + swa_ideal):.2f}x"
        for p, r in runs.items():
            f = runs["full"]
            print(f"| {tokens} | {p} | {r['prefill_s']:.2f} | {f['prefill_s'] / r['prefill_s']:.2f}x | "
                  f"{r['attn_gflop']:.0f} | {lin:.0f} | {ideal} | {r['decode_ms']:.1f} | "
                  f"{f['decode_ms'] / r['decode_ms']:.2f}x |", flush=True)
        del full


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384, help="attention-only prefill length")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8, help="attention-only rows' query heads")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--model-tokens", type=int, nargs="*", default=None, help="whole-model prefill lengths "
                   "(default: --tokens; none given: no model rows)")
    p.add_argument("--model-dim", type=int, default=4096, help="the model's width (Mistral 7B: 4096)")
    p.add_argument("--model-layers", type=int, default=2)
    p.add_argument("--model-hidden", type=int, default=1024, help="the model's FFN width")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--query-block", type=int, default=QUERY_BLOCK, help="chunks longer than this attend by "
                   "query blocks of this many (or, flex, as one FlexAttention call); shorter ones densely")
    p.add_argument("--repeats", type=int, default=3, help="rounds over the paths, in turn; each path's fastest")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--flex", action=argparse.BooleanOptionalAction, default=None,
                   help="add FlexAttention rows (default: on a GPU only; on the CPU it runs unfused)")
    p.add_argument("--quick", action="store_true", help="2048 tokens, W=512, a 1024-token model run")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one attention-only run in this process (in_child)
    a = p.parse_args()
    if a.child:
        job = json.loads(a.child)
        torch.set_num_threads(job["args"]["threads"] or torch.get_num_threads())
        run = argparse.Namespace(**job["args"]), job["path"], job["chunk"]
        attention_run(*run)  # warm-up: a fresh process's first run pays page faults and kernel set-up (~2 s)
        print(json.dumps(attention_run(*run)))  # the same sizes again: the peak RSS is unchanged
        return
    on_gpu = a.device.startswith("cuda")
    a.dtype = a.dtype or ("bfloat16" if on_gpu else "float32")
    a.flex = on_gpu if a.flex is None else a.flex
    if a.quick:
        a.tokens, a.window, a.model_tokens, a.decode_steps, a.repeats = 2048, 512, [1024], 4, 1
    if a.model_tokens is None:
        a.model_tokens = [a.tokens]
    if a.threads:
        torch.set_num_threads(a.threads)
    attention_table(a)
    if a.model_tokens:
        model_table(a)


if __name__ == "__main__":
    main()
