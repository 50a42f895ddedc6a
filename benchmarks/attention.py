"""Attention + KV cache cost at 16k tokens: sliding window (W=4096, rolling cache) vs full attention.

The seed claims SWA is 2x faster at 16k tokens with W=4096 (with FlashAttention/xFormers kernels that
skip masked blocks). Gale's CPU path uses PyTorch SDPA with a dense mask over [cache ; chunk], so its
cost follows the number of keys each chunk looks at; this prints what we measure, same machine, one run.

    python benchmarks/attention.py [--tokens 16384 --window 4096 --heads 8 --kv-heads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from gale.cache import RollingCache
from gale.config import ModelArgs
from gale.model import Attention, rope_rotations


def run(args: ModelArgs, tokens: int, chunk: int, decode_steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    attn = Attention(args).eval()
    cache = RollingCache(args, 1, capacity=None)
    x = torch.randn(tokens, args.dim)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, tokens, chunk):
            meta = cache.prepare([0], [min(chunk, tokens - i)])
            attn(x[i : i + chunk], rope_rotations(meta.positions, args.head_dim, args.rope_theta), meta, cache, 0)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(decode_steps):
            meta = cache.prepare([0], [1])
            attn(x[:1], rope_rotations(meta.positions, args.head_dim, args.rope_theta), meta, cache, 0)
        decode = (time.perf_counter() - t0) / decode_steps
    return {"prefill_s": prefill, "decode_ms": decode * 1e3, "cache_mib": cache.nbytes / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = dict(dim=256, n_layers=1, head_dim=a.head_dim, hidden_dim=256, n_heads=a.heads, n_kv_heads=a.kv_heads,
                 vocab_size=16, max_seq_len=a.tokens + a.decode_steps)
    swa = run(ModelArgs(**shape, sliding_window=a.window), a.tokens, a.window, a.decode_steps)
    full = run(ModelArgs(**shape, sliding_window=None), a.tokens, a.window, a.decode_steps)
    print(f"one attention layer, {a.heads} query / {a.kv_heads} KV heads of {a.head_dim}, {a.tokens} tokens, "
          f"prefill chunk {a.window}, {torch.get_num_threads()} threads")
    print(f"| {'':24} | {'full attention':>15} | {f'SWA W={a.window}':>15} | {'full / SWA':>10} |")
    print(f"|{'-' * 26}|{'-' * 17}|{'-' * 17}|{'-' * 12}|")
    for key, label in (("prefill_s", "chunked prefill (s)"), ("decode_ms", f"decode @ {a.tokens} (ms/token)"),
                       ("cache_mib", "KV cache (MiB)")):
        print(f"| {label:24} | {full[key]:15.3f} | {swa[key]:15.3f} | {full[key] / swa[key]:9.2f}x |")


if __name__ == "__main__":
    main()
