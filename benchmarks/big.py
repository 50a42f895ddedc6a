"""Mistral 7B-shaped GGUF files on the CPU: Gale vs llama.cpp, same files, same threads, one command.

    .venv/bin/python benchmarks/big.py --threads 2            # the real shape: ~35 GB of files, made once
    .venv/bin/python benchmarks/big.py --layers 2             # a quick look (and what the tests run)

Makes a Mistral-7B-shaped model of random weights (dim 4096, 32 layers, 32 query / 8 KV heads of 128, hidden 14336,
vocab 32000 with Mistral's real v1 tokenizer from mistral-common, window 4096) as an F16 GGUF through Gale's own
writer (`gale quantize`'s), derives Q4_K_M, Q4_0, Q8_0 and Q5_K_M files from it with llama.cpp's own quantizer
(`llama_model_quantize` from llama-cpp-python), caches them under --cache (outside the repo), then runs each engine
on each file (read through the page cache first) in a subprocess of its own (clean load time and peak RSS) and
prints: the library's import time (`import gale.llm` / `llama_cpp`, after torch), load time (opening the file until
ready, imports excluded), peak RSS (and over a bare `import torch` process), prefill tok/s for a --prompt-tokens
prompt, decode tok/s at batch 1 and batch 4, and the bandwidth roofline: bytes read per decoded token (every weight
but the embedding table) / the read bandwidth this script measures (torch.sum over 2 GB, the same threads).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cpu import gale_single, median, rss_mb, run_json  # the sibling benchmark's measurements

SHAPE = dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8, vocab_size=32000,
             sliding_window=4096, max_seq_len=8192, rope_theta=10000.0)
FTYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
          "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}  # the most downloaded kinds, and Q4_0
PROMPT = "The history of computing is a story of ideas, machines and people. "


def random_checkpoint(layers: int):  # noqa: ANN201 - a gale Checkpoint
    """Mistral 7B's shapes with `layers` layers, random N(0, 0.02) weights made on demand (one tensor at a
    time, seeded by name: the same file every time)."""
    import torch

    from gale.config import ModelArgs
    from gale.weights import Checkpoint, model_shapes

    args = ModelArgs(**{**SHAPE, "n_layers": layers})
    shapes = model_shapes(args)

    def read(name: str) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shapes[name])
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return torch.randn(shapes[name], generator=g) * 0.02

    path = Path(f"mistral-7b-shaped-{layers}L")
    return Checkpoint(path=path, format="random", args=args, shapes=shapes, storage=dict.fromkeys(shapes, "F32"),
                      files=dict.fromkeys(shapes, path), read=read)


def make_files(cache: Path, layers: int, kinds: list[str], threads: int) -> dict[str, Path]:
    """The F16 file (Gale's writer) and each kind derived from it by llama.cpp's quantizer, made once."""
    from gale.tokenizer import load_tokenizer
    from gale.weights.export import write_gguf

    cache.mkdir(parents=True, exist_ok=True)
    f16 = cache / f"mistral-7b-shaped-{layers}L.F16.gguf"
    derived = [cache / f"mistral-7b-shaped-{layers}L.{kind}.gguf" for kind in kinds]
    if not f16.exists() and not all(p.exists() for p in derived):  # the F16 may be deleted once they are made
        import mistral_common

        v1 = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
        print(f"writing {f16} ...", file=sys.stderr, flush=True)
        write_gguf(random_checkpoint(layers), f16, "F16", tokenizer=load_tokenizer(v1))
    files = {}
    for kind in kinds:
        out = cache / f"mistral-7b-shaped-{layers}L.{kind}.gguf"
        if not out.exists():
            import llama_cpp

            print(f"quantizing {out.name} with llama.cpp ...", file=sys.stderr, flush=True)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = getattr(llama_cpp, FTYPES[kind]), threads
            tmp = out.with_suffix(".partial")
            if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params)):
                raise SystemExit(f"llama.cpp could not quantize {f16} to {kind}")
            tmp.rename(out)
        files[kind] = out
    return files


def weight_bytes_per_token(path: Path) -> int:
    """Bytes a decode step reads: every tensor of the file but the token embedding (one row of it)."""
    from gale.weights.gguf import read_gguf

    _, header = read_gguf(path)
    return sum(header.nbytes(n) for n in header.tensors if n != "token_embd.weight")


# ---------------------------------------------------------------------------------------------------------
# engines (each in its own subprocess, answering one JSON line)
# ---------------------------------------------------------------------------------------------------------
def run_torch(a: argparse.Namespace) -> dict:
    """A bare torch process (the RSS baseline) and the read bandwidth of this machine at these threads."""
    import torch

    rss = rss_mb()
    torch.set_num_threads(a.threads)
    x = torch.ones(2**29)  # 2 GiB
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return {"rss_mb": rss, "read_gbs": x.numel() * 4 / best / 1e9}


def _timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_gale(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    import gale.llm  # the library: its import is import_s, outside load_s, as for llama_cpp
    from gale.sampling import SamplingParams

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm = gale.llm.load(a.model, device="cpu", dtype="fp32", max_seqs=4, progress=False, prefix_cache_tokens=0)
    load_s = time.perf_counter() - t0
    ids = (llm.tokenizer.encode(PROMPT * 200))[: a.prompt_tokens]
    # warm-up at the timed length: Gale's KV cache grows on demand (doubling; 512 -> 1024 slots costs ~1 s once
    # at 7B), llama.cpp's context is allocated at load, so neither pays an allocation inside the timed decode
    gale_single(llm.engine, ids, 2)
    runs = [gale_single(llm.engine, ids, a.decode_tokens)[:2] for _ in range(a.repeats)]
    out = {"import_s": import_s, "load_s": load_s, "prefill_tps": len(ids) / median([r[0] for r in runs]),
           "decode_tps": median([r[1] for r in runs]), "rss_b1_mb": rss_mb()}
    prompts = [ids[i * 8:(i + 1) * 8] for i in range(4)]
    params = [SamplingParams(max_tokens=a.decode_tokens, ignore_eos=True)] * 4
    llm.engine.generate(prompts, [SamplingParams(max_tokens=2, ignore_eos=True)] * 4)
    seqs = [llm.engine.add(p, q) for p, q in zip(prompts, params)]
    llm.engine.step()  # the four prompts and their first tokens: timed apart, as llama.cpp's run does
    t0 = time.perf_counter()
    while llm.engine.has_work:
        llm.engine.step()
    assert all(len(s.output) == a.decode_tokens for s in seqs), "short output"
    out["b4_tps"] = 4 * (a.decode_tokens - 1) / (time.perf_counter() - t0)
    out["rss_mb"] = rss_mb()
    return out


def run_llama(a: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    try:
        import llama_cpp
    except ImportError:
        return {"missing": "llama-cpp-python not installed (pip install -e .[bench])"}
    import_s = time.perf_counter() - t0
    import numpy as np

    from gale.tokenizer import load_tokenizer

    ids = load_tokenizer(a.model).encode(PROMPT * 200)[: a.prompt_tokens]  # the file's vocabulary: llama.cpp's ids
    t0 = time.perf_counter()
    # The C API directly: llama_cpp.Llama cannot open a context for several sequences.
    model = llama_cpp.llama_model_load_from_file(str(a.model).encode(), llama_cpp.llama_model_default_params())
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.n_seq_max = 2048, 512, 512, 4
    cparams.n_threads = cparams.n_threads_batch = a.threads
    cparams.kv_unified = True
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    load_s = time.perf_counter() - t0
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

    def step(tokens: list[int], seqs: list[int], positions: list[int]) -> list[int]:
        """One llama_decode of tokens for sequences at positions; greedy next token of each sequence's last."""
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 4)
        try:
            batch.n_tokens = len(tokens)
            last = {s: i for i, s in enumerate(seqs)}
            for i, (t, s, p) in enumerate(zip(tokens, seqs, positions)):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = t, p, 1, s
                batch.logits[i] = last[s] == i
            if llama_cpp.llama_decode(ctx, batch):
                raise RuntimeError("llama_decode failed")
            return [int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, last[s]), (n_vocab,)).argmax())
                    for s in sorted(last)]
        finally:
            llama_cpp.llama_batch_free(batch)

    def clear() -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)

    def single(prompt: list[int], n: int) -> tuple[float, float]:
        clear()
        t0 = time.perf_counter()
        for start in range(0, len(prompt), 512):
            chunk = prompt[start:start + 512]
            (tok,) = step(chunk, [0] * len(chunk), list(range(start, start + len(chunk))))
        t_first = time.perf_counter()
        for i in range(n - 1):
            (tok,) = step([tok], [0], [len(prompt) + i])
        return t_first - t0, (n - 1) / (time.perf_counter() - t_first)

    single(ids[:8], 2)
    runs = [single(ids, a.decode_tokens) for _ in range(a.repeats)]
    out = {"import_s": import_s, "load_s": load_s, "prefill_tps": len(ids) / median([r[0] for r in runs]),
           "decode_tps": median([r[1] for r in runs]), "rss_b1_mb": rss_mb(), "version": llama_cpp.__version__}
    clear()
    prompts = [ids[i * 8:(i + 1) * 8] for i in range(4)]
    toks = step([t for p in prompts for t in p], [s for s in range(4) for _ in range(8)], list(range(8)) * 4)
    t0 = time.perf_counter()
    for i in range(a.decode_tokens - 1):
        toks = step(toks, list(range(4)), [8 + i] * 4)
    out["b4_tps"] = 4 * (a.decode_tokens - 1) / (time.perf_counter() - t0)
    out["rss_mb"] = rss_mb()
    return out


ENGINES = {"torch": run_torch, "gale": run_gale, "llama.cpp": run_llama}


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------
def warm(path: Path) -> None:
    """Read the file through the page cache, so each engine starts from the same cached pages (a model a user
    has run before). Without it the first engine on a file the cache had dropped read it from disk while it
    decoded: this machine's RAM holds a few of the ~35 GB of files, and VM hosts reclaim cold pages."""
    buf = bytearray(64 << 20)
    with path.open("rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def spawn(a: argparse.Namespace, engine: str, model: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--engine", engine, "--threads", str(a.threads), "--repeats", str(a.repeats),
           "--prompt-tokens", str(a.prompt_tokens), "--decode-tokens", str(a.decode_tokens)]
    if model:
        cmd += ["--model", str(model)]
        warm(model)
    print(f"  {engine} on {model.name if model else '-'} ...", file=sys.stderr, flush=True)
    return run_json(cmd)


def table(results: dict[str, dict[str, dict]], base: dict, per_token: dict[str, int]) -> str:
    gbs = base["read_gbs"]
    cols = [("import_s", "import s", 2), ("load_s", "load s", 2), ("prefill_tps", "prefill tok/s", 2),
            ("decode_tps", "decode tok/s B=1", 2), ("b4_tps", "tok/s B=4", 2), ("rss_mb", "peak RSS MB", 0)]
    lines = ["| file | engine | " + " | ".join(c[1] for c in cols) + " | RSS over torch MB | B=1 / roofline |",
             "|" + "---|" * (len(cols) + 4)]
    for kind, engines in results.items():
        roof = gbs * 1e9 / per_token[kind]
        for name, r in engines.items():
            if "error" in r or "missing" in r:
                lines.append(f"| {kind} | {name} | {(r.get('error') or r['missing'])[:160]} |" + " |" * (len(cols) + 1))
                continue
            g = engines.get("gale", {})
            cells = []
            for key, _, digits in cols:
                v = r.get(key)
                ratio = f" ({g[key] / v:.2f}x)" if name != "gale" and g.get(key) and v else ""
                cells.append("n/a" if v is None else f"{v:.{digits}f}{ratio}")
            over = r["rss_mb"] - base["rss_mb"]
            lines.append(f"| {kind} | {name}{' ' + r['version'] if r.get('version') else ''} | " + " | ".join(cells)
                         + f" | {over:.0f} | {r['decode_tps'] / roof:.0%} of {roof:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="layers of the 7B shape (32 = Mistral 7B)")
    p.add_argument("--kinds", nargs="*", default=list(FTYPES), choices=list(FTYPES))
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "gale-bench")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--engines", nargs="*", default=list(ENGINES)[1:])
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.engine:  # child
        print(json.dumps(ENGINES[a.engine](a)), flush=True)
        return
    files = make_files(a.cache, a.layers, a.kinds, a.threads)
    base = spawn(a, "torch", None)
    results = {kind: {name: spawn(a, name, path) for name in a.engines} for kind, path in files.items()}
    per_token = {kind: weight_bytes_per_token(path) for kind, path in files.items()}
    # A shared host's bandwidth moves within the hour (37-64 GB/s in one session): read it again after the
    # engines, and take the larger reading for the roofline (the stricter one).
    reads = [base["read_gbs"], spawn(a, "torch", None)["read_gbs"]]
    base["read_gbs"] = max(reads)
    print(f"Mistral 7B shape, {a.layers} layers, random weights; {a.threads} threads; prompt {a.prompt_tokens} "
          f"tokens; decode {a.decode_tokens} tokens (B=1: after the prompt; B=4: four 8-token prompts, timed from "
          "their first tokens); "
          f"median of {a.repeats}.")
    print(f"Bare `import torch` process: {base['rss_mb']:.0f} MB RSS; read bandwidth {reads[0]:.1f} GB/s before the "
          f"engines, {reads[1]:.1f} after (torch.sum over 2 GiB, {a.threads} threads). Roofline = the larger / bytes "
          "read per token.\n")
    print(table(results, base, per_token))
    print("\n(Nx) = Gale / llama.cpp: above 1 Gale is faster for tok/s, slower for s, heavier for MB.")
    for kind, path in files.items():
        print(f"{kind}: {path} ({path.stat().st_size / 1e9:.2f} GB, {per_token[kind] / 1e9:.2f} GB read per token)")


if __name__ == "__main__":
    main()
