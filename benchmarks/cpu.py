"""CPU benchmark: Gale vs llama.cpp (llama-cpp-python) vs Hugging Face transformers, one command.

    /tmp/benchvenv/bin/python benchmarks/cpu.py --threads 2 --repeats 3

Every engine runs in its own subprocess (this script re-invoked with `--engine NAME`, answering one JSON
line), so load time and peak RSS are clean. All engines get the same GGUF file, the same token ids and the
same thread count. Speed figures are medians over `--repeats` runs after one warm-up.

Figures: import (s: the library's own import, `import gale.llm` / `llama_cpp` / `transformers`, after
torch); load (s: opening the file until ready, imports excluded); TTFT (s) for a 512-token prompt, prefill
tok/s = 512 / TTFT; decode tok/s at batch 1 for 128 greedy tokens after that prompt (EOS ignored; measured from
the first token to the last); throughput at batch 8 and 32 (new tokens / wall time, distinct short prompts, EOS
ignored); peak RSS (MB) after the batch-1 runs. A synthetic ~1B Mistral (random weights, sliding window)
compares Gale with transformers' MistralForCausalLM on identical weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CHAT_Q = "What is the capital of France?"
FILLER = (
    "The history of computing is a story of ideas, machines and people. Early mechanical calculators gave way "
    "to electronic computers, then to transistors, integrated circuits and the microprocessor. "
)
SYNTH = dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, hidden_dim=5632, window=4096, vocab=32000)


def rss_mb() -> float:
    """Peak RSS of this process in MB. VmHWM, not getrusage's ru_maxrss: that one survives exec, so a child
    would report its parent's peak when the parent was bigger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def single_stream(run: Callable[[list[int], int], tuple], ids: list[int], new_tokens: int,
                  repeats: int) -> dict[str, float]:
    """Batch-1 figures of any engine: `run(ids, n)` returns (time to first token, decode tok/s, ...);
    one short warm-up, then medians over `repeats` runs."""
    run(ids[:16], 4)
    runs = [run(ids, new_tokens)[:2] for _ in range(repeats)]
    ttft = median([t for t, _ in runs])
    return {"ttft_s": ttft, "prefill_tps": len(ids) / ttft, "decode_tps": median([d for _, d in runs])}


def batch_prompts(b: int) -> list[str]:
    topics = ["rivers", "mountains", "cities", "music", "chess", "bread", "trains", "the moon"]
    return [f"Request {i}: write a short paragraph about {topics[i % len(topics)]} number {i}." for i in range(b)]


# ---------------------------------------------------------------------------------------------------------
# engines (each runs inside its own subprocess)
# ---------------------------------------------------------------------------------------------------------
def run_torch(a: argparse.Namespace, __: dict) -> dict:
    """A bare torch process: its RSS (the baseline of every engine's) and the machine's fp32 GEMM peak."""
    import torch

    rss = rss_mb()
    torch.set_num_threads(a.threads)
    x = torch.randn(3072, 3072)
    x @ x
    t0 = time.perf_counter()
    for _ in range(3):
        x @ x
    return {"rss_mb": rss, "gemm_gflops": 3 * 2 * 3072**3 / (time.perf_counter() - t0) / 1e9}


def gale_single(engine, prompt: list[int], n: int) -> tuple[float, float, list[int]]:  # noqa: ANN001
    """(TTFT s, decode tok/s, output ids) for one sequence through Gale's Engine."""
    from gale.sampling import SamplingParams

    t0 = time.perf_counter()
    seq = engine.add(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
    t_first = None
    while not seq.finished:
        engine.step()
        if t_first is None and seq.output:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    return t_first - t0, (len(seq.output) - 1) / (t_end - t_first), list(seq.output)


def run_gale(a: argparse.Namespace, job: dict) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    import gale.llm  # the library: its import is import_s, outside load_s, as for llama_cpp and transformers
    from gale.engine import Engine

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # No prefix cache: every repeat computes its whole prompt (llama.cpp's runs reset their cache too).
    llm = gale.llm.load(a.model, device="cpu", dtype="fp32", max_seqs=1, progress=False, prefix_cache_tokens=0)
    load_s = time.perf_counter() - t0
    figures = single_stream(lambda ids, k: gale_single(llm.engine, ids, k), job["long"], a.decode_tokens, a.repeats)
    text = llm.chat([{"role": "user", "content": CHAT_Q}], max_tokens=40).text
    weights = sum(m.in_features * m.out_features for m in llm.model.layers.modules() if hasattr(m, "in_features"))
    out = {"import_s": import_s, "load_s": load_s, **figures, "rss_mb": rss_mb(), "text": text,
           "gflop_per_token": 2 * weights / 1e9}
    for b in a.batches:
        llm.engine = Engine(llm.model, llm.tokenizer, max_seqs=b, prefix_cache_tokens=0)
        prompts = batch_prompts(b)
        llm.generate(prompts[:2], max_tokens=2, ignore_eos=True)  # warm-up
        ts = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            res = llm.generate(prompts, max_tokens=a.batch_tokens, ignore_eos=True)
            ts.append(time.perf_counter() - t0)
            assert sum(len(r.token_ids) for r in res) == b * a.batch_tokens, "short output"
        out[f"b{b}_tps"] = b * a.batch_tokens / median(ts)
    out["rss_peak_mb"] = rss_mb()
    return out


def run_llama(a: argparse.Namespace, job: dict) -> dict:
    t0 = time.perf_counter()
    try:
        import llama_cpp
    except ImportError:
        return {"missing": "not installed (pip install -e .[bench])"}
    import_s = time.perf_counter() - t0

    def single(llm, prompt: list[int], n: int) -> tuple[float, float]:  # noqa: ANN001
        llm.reset()
        t0 = time.perf_counter()
        t_first, count = None, 0
        # Llama.generate never stops on EOS by itself: exactly `n` greedy tokens.
        for _ in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            count += 1
            if t_first is None:
                t_first = time.perf_counter()
            if count == n:
                break
        t_end = time.perf_counter()
        return t_first - t0, (count - 1) / (t_end - t_first)

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(a.model), n_ctx=2048, n_batch=512, n_threads=a.threads,
                          n_threads_batch=a.threads, verbose=False)
    load_s = time.perf_counter() - t0
    figures = single_stream(lambda ids, k: single(llm, ids, k), job["long"], a.decode_tokens, a.repeats)
    llm.reset()
    resp = llm.create_chat_completion([{"role": "user", "content": CHAT_Q}], temperature=0.0, top_k=1,
                                      max_tokens=40, repeat_penalty=1.0)
    return {"import_s": import_s, "load_s": load_s, **figures, "rss_mb": rss_mb(),
            "text": resp["choices"][0]["message"]["content"], "version": llama_cpp.__version__}


class _Clock:
    """A transformers streamer that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.calls, self.t_first = 0, None

    def put(self, value) -> None:  # noqa: ANN001 - first call is the prompt, then one per new token
        self.calls += 1
        if self.calls == 2 and self.t_first is None:
            self.t_first = time.perf_counter()

    def end(self) -> None:
        pass


def hf_single(model, ids: list[int], n: int) -> tuple[float, float]:  # noqa: ANN001
    import torch

    x = torch.tensor([ids])
    clock = _Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, streamer=clock, pad_token_id=0)
    t_end = time.perf_counter()
    got = out.shape[1] - len(ids)
    return clock.t_first - t0, (got - 1) / (t_end - clock.t_first)


def run_hf(a: argparse.Namespace, job: dict) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_s = time.perf_counter() - t0
    transformers.logging.set_verbosity_error()
    model_path = Path(a.model)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    figures = single_stream(lambda ids, k: hf_single(model, ids, k), job["long"], a.decode_tokens, a.repeats)
    chat_ids = tok.apply_chat_template([{"role": "user", "content": CHAT_Q}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        o = model.generate(**chat_ids, max_new_tokens=40, do_sample=False)
    text = tok.decode(o[0, chat_ids["input_ids"].shape[1]:], skip_special_tokens=True)
    out = {"import_s": import_s, "load_s": load_s, **figures, "rss_mb": rss_mb(), "text": text,
           "version": transformers.__version__}
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    for b in a.batches:
        enc = tok(batch_prompts(b), return_tensors="pt", padding=True)
        ts = []
        for i in range(a.repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            with torch.inference_mode():
                o = model.generate(**enc, max_new_tokens=a.batch_tokens, min_new_tokens=a.batch_tokens,
                                   do_sample=False, pad_token_id=tok.pad_token_id)
            if i:
                ts.append(time.perf_counter() - t0)
            assert o.shape[1] - enc["input_ids"].shape[1] == a.batch_tokens
        out[f"b{b}_tps"] = b * a.batch_tokens / median(ts)
    out["rss_peak_mb"] = rss_mb()
    return out


def synth_hf_model():  # noqa: ANN201
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    s = SYNTH
    cfg = MistralConfig(hidden_size=s["dim"], intermediate_size=s["hidden_dim"], num_hidden_layers=s["n_layers"],
                        num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"],
                        sliding_window=s["window"], vocab_size=s["vocab"], max_position_embeddings=8192,
                        rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    return MistralForCausalLM(cfg).eval()


def last_logits_head(logits) -> list[float]:  # noqa: ANN001
    return [round(float(v), 4) for v in logits.reshape(-1)[:8]]


def run_synth_hf(a: argparse.Namespace, job: dict) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    model = synth_hf_model()
    ids = job["synth"]
    with torch.inference_mode():
        head = last_logits_head(model(torch.tensor([ids])).logits[0, -1])
    figures = single_stream(lambda ids, k: hf_single(model, ids, k), ids, a.synth_decode, a.repeats)
    return {**figures, "logits": head, "rss_mb": rss_mb()}


class _Silent:
    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


class NullTokenizer:
    """The engine's tokenizer interface without text: random ids have none, and no id stops a sequence (the
    synthetic rows here and benchmarks/gpu.py)."""

    stop_ids: frozenset[int] = frozenset()

    def decoder(self, context: list[int]) -> _Silent:
        return _Silent()


def run_synth_gale(a: argparse.Namespace, job: dict) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from gale.config import ModelArgs
    from gale.engine import Engine
    from gale.model import Transformer
    from gale.weights.hf import from_hf

    s = SYNTH
    args = ModelArgs(dim=s["dim"], n_layers=s["n_layers"], head_dim=s["dim"] // s["n_heads"],
                     hidden_dim=s["hidden_dim"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                     vocab_size=s["vocab"], sliding_window=s["window"], max_seq_len=8192, rope_theta=10000.0)
    hf = synth_hf_model()
    state = dict(from_hf(k, v, args) for k, v in hf.state_dict().items())
    del hf
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, assign=True)
    model.eval()
    del state
    gc.collect()
    ids = job["synth"]
    with torch.inference_mode():
        head = last_logits_head(model(torch.tensor(ids), last_only=True)[0])
    engine = Engine(model, NullTokenizer(), max_seqs=1, prefix_cache_tokens=0)
    figures = single_stream(lambda ids, k: gale_single(engine, ids, k), ids, a.synth_decode, a.repeats)
    return {**figures, "logits": head, "rss_mb": rss_mb()}


ENGINES = {"torch": run_torch, "gale": run_gale, "llama.cpp": run_llama, "transformers": run_hf,
           "synth-gale": run_synth_gale, "synth-hf": run_synth_hf}


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------
def machine(threads: int) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} logical cores, {threads} threads, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def spawn(a: argparse.Namespace, name: str, job_file: str) -> dict:
    cmd = [sys.executable, __file__, "--engine", name, "--job", job_file, "--model", str(a.model),
           "--threads", str(a.threads), "--repeats", str(a.repeats), "--decode-tokens", str(a.decode_tokens),
           "--batch-tokens", str(a.batch_tokens), "--synth-decode", str(a.synth_decode),
           "--batches", *map(str, a.batches)]
    print(f"  running {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out = run_json(cmd)
    if "error" not in out:
        print(f"  {name} done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return out


def run_json(cmd: list[str]) -> dict:
    """A worker process's last JSON line, or {"error": its exit status and last lines of output}."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {p.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def fmt(v: float | None, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def cell(res: dict, gale: dict, key: str, digits: int) -> str:
    v = res.get(key)
    if v is None:
        return "n/a"
    g = gale.get(key)
    if res is gale or g is None or not v:
        return fmt(v, digits)
    return f"{fmt(v, digits)} ({g / v:.2f}x)"


COLUMNS = [("import_s", "import s", 2), ("load_s", "load s", 2), ("prefill_tps", "prefill tok/s (512)", 1),
           ("ttft_s", "TTFT s (512)", 3),
           ("decode_tps", "decode tok/s (B=1)", 1), ("b8_tps", "tok/s B=8", 1), ("b32_tps", "tok/s B=32", 1),
           ("rss_mb", "peak RSS MB (B=1)", 0)]


def table(results: dict[str, dict], a: argparse.Namespace) -> str:
    n = str(a.prompt_tokens)
    cols = [(k, label.replace("512", n), d) for k, label, d in COLUMNS]
    cols = [c for c in cols if not (c[0].startswith("b") and int(c[0][1:-4]) not in a.batches)]
    extra = [(f"b{b}_tps", f"tok/s B={b}", 1) for b in a.batches if b not in (8, 32)]
    cols = cols[:6] + extra + cols[6:]
    head = "| engine | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    gale = results.get("gale", {})
    for name, res in results.items():
        if name == "torch":
            continue
        if "missing" in res or "error" in res:
            lines.append(f"| {name} | " + (res.get("missing") or res["error"])[:200] + " |" + " |" * (len(cols) - 1))
            continue
        label = f"{name} {res['version']}" if res.get("version") else name
        lines.append(f"| {label} | " + " | ".join(cell(res, gale, k, d) for k, _, d in cols) + " |")
    return "\n".join(lines)


def synth_table(g: dict, h: dict) -> str:
    s = SYNTH
    shape = (f"dim {s['dim']}, {s['n_layers']} layers, {s['n_heads']}/{s['n_kv_heads']} heads, "
             f"hidden {s['hidden_dim']}, window {s['window']}, vocab {s['vocab']}")
    lines = [f"Synthetic Mistral ({shape}; random fp32 weights, identical in both):", "",
             "| engine | prefill tok/s (512) | TTFT s (512) | decode tok/s (B=1) | peak RSS MB |",
             "|---|---|---|---|---|"]
    for name, r in (("gale", g), ("transformers MistralForCausalLM", h)):
        if "error" in r:
            lines.append(f"| {name} | {r['error'][:200]} | | | |")
            continue
        lines.append(f"| {name} | " + " | ".join(cell(r, g, k, d) for k, d in
                                                 (("prefill_tps", 1), ("ttft_s", 3), ("decode_tps", 2), ("rss_mb", 0)))
                     + " |")
    if "logits" in g and "logits" in h:
        diff = max(abs(x - y) for x, y in zip(g["logits"], h["logits"]))
        lines.append(f"\nSame-weights check: max |logit diff| over 8 logits of the last prompt token = {diff:.2e}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="*", default=[8, 32])
    p.add_argument("--batch-tokens", type=int, default=64, help="new tokens per sequence in the batch runs")
    p.add_argument("--synth-decode", type=int, default=64)
    p.add_argument("--no-synth", action="store_true", help="skip the synthetic ~1B Mistral comparison")
    p.add_argument("--engines", nargs="*", default=["gale", "llama.cpp", "transformers"])
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.engine:  # child: run one engine, print one JSON line
        job = json.loads(Path(a.job).read_text())
        print(json.dumps(ENGINES[a.engine](a, job)), flush=True)
        return

    from gale.llm import default_model_path
    from gale.tokenizer import load_tokenizer

    a.model = a.model or default_model_path()
    tok = load_tokenizer(a.model)
    ids = tok.encode(FILLER * 200)
    job = {"long": ids[: a.prompt_tokens], "synth": [(7 * i + 3) % SYNTH["vocab"] for i in range(a.prompt_tokens)]}
    assert len(job["long"]) == a.prompt_tokens
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    print(f"Machine: {machine(a.threads)}")
    print(f"Model: {a.model} ({a.model.stat().st_size / 2**20:.0f} MB)")
    try:
        results = {"torch": spawn(a, "torch", f.name)}
        for name in a.engines:
            results[name] = spawn(a, name, f.name)
        synth = None if a.no_synth else (spawn(a, "synth-gale", f.name), spawn(a, "synth-hf", f.name))
    finally:
        os.unlink(f.name)
    print(f"Repeats: {a.repeats} (median); prompt {a.prompt_tokens} tokens; decode {a.decode_tokens} tokens at B=1; "
          f"batch runs {a.batch_tokens} new tokens per sequence; EOS ignored; greedy.")
    print(f"Bare `import torch` process: peak RSS {results['torch'].get('rss_mb', float('nan')):.0f} MB\n")
    print(table(results, a))
    print("\nIn peer rows, (Nx) = Gale / peer: above 1 Gale is faster for tok/s, slower for s and heavier for MB.")
    for name, res in results.items():
        if "peak" in name or "rss_peak_mb" in res:
            print(f"{name}: peak RSS after batch runs {res['rss_peak_mb']:.0f} MB")
    gemm, gale = results["torch"].get("gemm_gflops"), results.get("gale", {})
    if gemm and "gflop_per_token" in gale:
        hf = results.get("transformers", {}).get("prefill_tps")
        print(f"Prefill ceiling: fp32 GEMM peak {gemm:.1f} GFLOPS (torch.mm 3072x3072, {a.threads} threads) / "
              f"{gale['gflop_per_token']:.3f} GFLOP per token (2 x layer weights, attention left out) = "
              f"{gemm / gale['gflop_per_token']:.0f} tok/s at most for any fp32 engine"
              + (f"; 3x transformers would be {3 * hf:.0f} tok/s." if hf else "."))
    print(f'\nGreedy answers to "{CHAT_Q}" (chat template, 40 tokens max):')
    for name, res in results.items():
        if "text" in res:
            print(f"- {name}: {res['text']!r}")
    if synth:
        print("\n" + synth_table(*synth))


if __name__ == "__main__":
    main()
