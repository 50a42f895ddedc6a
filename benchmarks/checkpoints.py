"""Safetensors checkpoints of Mistral 7B's shape on the CPU: quantize on load vs llama.cpp-quantized GGUFs.

    .venv/bin/python benchmarks/checkpoints.py --threads 2            # 7B: ~30 GB of folders, ~25 GB of GGUFs
    .venv/bin/python benchmarks/checkpoints.py --layers 1 --dim 512   # a tiny check of the script itself

Writes a random 7B-shaped model (std 0.02 bf16 weights, Mistral's 32000-token tokenizer, generated tensor by
tensor, so writing it never holds the model) as an official folder (params.json + consolidated.safetensors) and
a Hugging Face folder (sharded, rotate-half q/k rows) under --root, outside the repository, one at a time and
each removed after its runs unless --keep (~27 GB of disk at once at 7B). Then, each in its own process: a
bare torch process (the RSS baseline), Gale loading the official folder with no flag (auto), with --quantize
q8_0 and q4_k, the HF folder with q8_0, and Gale loading the Q8_0 and Q4_K_M GGUFs that llama.cpp's quantizer
makes from an F16 GGUF of the same weights (skipped without llama-cpp-python). Figures: load time, peak RSS
over bare torch against the quantized weights + the K/V cache, decode tok/s at batch 1.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

from gale.config import ModelArgs, to_hf_config, to_params_json

sys.path.insert(0, str(Path(__file__).parent))
from cpu import rss_mb, run_json

ROOT = Path.home() / ".cache" / "gale-bench" / "checkpoints"
MISTRAL_V1 = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data/tokenizer.model.v1"
PROMPT = "The history of computing is a story of ideas, machines and people. Early mechanical calculators"


def model_args(a: argparse.Namespace) -> ModelArgs:
    d = ModelArgs()
    if a.dim == d.dim and a.layers == d.n_layers:
        return d
    return ModelArgs(dim=a.dim, n_layers=a.layers, hidden_dim=a.dim * 7 // 2 // 256 * 256, n_heads=a.dim // 128,
                     n_kv_heads=max(1, a.dim // 512), head_dim=128)


def _tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Deterministic per name: both folders hold the same weights without holding the model."""
    g = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], make) -> None:  # noqa: ANN001
    """A bf16 safetensors file written one tensor at a time (`make(name)` gives each)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in shapes:
            f.write(make(name).contiguous().view(torch.uint8).numpy().tobytes())
    tmp.replace(path)


def _folder(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "tokenizer.model").exists():
        (folder / "tokenizer.model").symlink_to(MISTRAL_V1)
    return folder


def make_official(args: ModelArgs, root: Path) -> Path:
    from gale.weights import model_shapes

    shapes, official = model_shapes(args), _folder(root, "official")
    if not (official / "consolidated.safetensors").exists():
        print("writing the official folder ...", file=sys.stderr)
        (official / "params.json").write_text(json.dumps(to_params_json(args)))
        write_safetensors(official / "consolidated.safetensors", shapes, lambda n: _tensor(n, shapes[n]))
    return official


def make_hf(args: ModelArgs, root: Path) -> Path:
    from gale.weights import model_shapes
    from gale.weights.hf import hf_name, to_hf

    shapes, hf = model_shapes(args), _folder(root, "hf")
    if not (hf / "model.safetensors.index.json").exists():
        print("writing the HF folder ...", file=sys.stderr)
        (hf / "config.json").write_text(json.dumps(to_hf_config(args)))
        shards, size, weight_map = [{}], 0, {}
        for name, shape in shapes.items():  # ~5 GB shards, as the Hub's
            if shards[-1] and size > 5e9:
                shards.append({})
                size = 0
            shards[-1][name] = shape
            size += 2 * torch.Size(shape).numel()
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            ours = {hf_name(n): n for n in shard}
            write_safetensors(hf / fname, {h: shard[n] for h, n in ours.items()},
                              lambda h, ours=ours: to_hf(ours[h], _tensor(ours[h], shapes[ours[h]]), args)[1])
            weight_map.update(dict.fromkeys(ours, fname))
        (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return hf


def remove(path: Path) -> None:
    """Free the disk a stage used (--keep skips it): the 7B run needs ~27 GB at a time instead of ~55 GB."""
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)  # rmtree unlinks symlinks, not targets


def make_llama_cpp_ggufs(official: Path, root: Path) -> dict[str, Path]:
    """Q8_0 and Q4_K_M GGUFs by llama.cpp's quantizer, from an F16 GGUF of the same weights; {} without it."""
    try:
        import llama_cpp
    except ImportError:
        return {}
    from gale.tokenizer import load_tokenizer
    from gale.weights import open_checkpoint, write_gguf

    f16 = root / "f16.gguf"
    if not f16.exists() and not all((root / f"llama.cpp.{s}.gguf").exists() for s in ("Q8_0", "Q4_K_M")):
        write_gguf(open_checkpoint(official), f16, "F16", tokenizer=load_tokenizer(official))
    out = {}
    for scheme in ("Q8_0", "Q4_K_M"):  # skipped when already made (also with the F16 removed since)
        path = root / f"llama.cpp.{scheme}.gguf"
        if not path.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{scheme}")
            params.nthread = os.cpu_count() or 1
            assert llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(), params) == 0
        out[scheme] = path
    return out


def run_one(a: argparse.Namespace) -> dict:
    """One measurement, inside its own process."""
    torch.set_num_threads(a.threads)
    if a.run == "torch":
        import gale

        return {"rss_mb": rss_mb()}
    import gale
    from gale.sampling import SamplingParams

    t0 = time.perf_counter()
    llm = gale.load(a.model, device="cpu", dtype="fp32", max_seqs=1, progress=False, prefix_cache_tokens=0,
                    quantize=a.quantize)
    load_s = time.perf_counter() - t0
    weights = sum(getattr(m, "blocks", None).nbytes for m in llm.model.modules() if hasattr(m, "blocks"))
    weights += sum(p.numel() * p.element_size() for p in llm.model.parameters())
    seq = llm.engine.add(llm.tokenizer.encode(PROMPT), SamplingParams(max_tokens=a.decode_tokens, ignore_eos=True))
    t_first = None
    while not seq.finished:
        llm.engine.step()
        if t_first is None and seq.output:
            t_first = time.perf_counter()
    decode = (len(seq.output) - 1) / (time.perf_counter() - t_first)
    kv = llm.engine.cache.nbytes
    return {"load_s": load_s, "rss_mb": rss_mb(), "weights_mb": weights / 2**20, "kv_mb": kv / 2**20,
            "decode_tps": decode, "quantize": llm.quantize, "kv_dtype": str(llm.engine.cache.dtype)}


def spawn(a: argparse.Namespace, run: str, model: Path | None = None, quantize: str = "auto") -> dict:
    cmd = [sys.executable, __file__, "--run", run, "--threads", str(a.threads), "--decode-tokens",
           str(a.decode_tokens), "--quantize", quantize, *(["--model", str(model)] if model else [])]
    print(f"  {run} {model.name if model else ''} {quantize} ...", file=sys.stderr, flush=True)
    return run_json(cmd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ROOT, help="where the folders and GGUFs go (outside the repo)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--keep", action="store_true", help="keep the folders and GGUFs (~55 GB at 7B) for a rerun")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--quantize", default="auto", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.run:
        print(json.dumps(run_one(a)))
        return
    args = model_args(a)
    root = a.root / f"{args.n_layers}x{args.dim}"
    tidy = (lambda path: None) if a.keep else remove
    base = spawn(a, "torch")
    official = make_official(args, root)
    runs = {"official, no flag": spawn(a, "gale", official),
            "official --quantize q8_0": spawn(a, "gale", official, "q8_0"),
            "official --quantize q4_k": spawn(a, "gale", official, "q4_k")}
    ggufs = make_llama_cpp_ggufs(official, root)
    tidy(official)
    tidy(root / "f16.gguf")
    runs.update({f"llama.cpp {s} GGUF": spawn(a, "gale", path) for s, path in ggufs.items()})
    hf = make_hf(args, root)
    runs["hf --quantize q8_0"] = spawn(a, "gale", hf, "q8_0")
    tidy(hf)
    print(f"\n{args.n_params / 1e9:.2f} B parameters, {a.threads} threads; bare torch + gale: "
          f"{base.get('rss_mb', 0):,.0f} MB\n")
    print("| run | load s | peak RSS over torch MB | weights + KV MB | ratio | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        if "error" in r:
            print(f"| {name} | {r['error']} |")
            continue
        over = r["rss_mb"] - base["rss_mb"]
        need = r["weights_mb"] + r["kv_mb"]
        print(f"| {name} ({r['quantize'] or 'as stored'}, KV {r['kv_dtype'][6:]}) | {r['load_s']:.1f} | {over:,.0f} "
              f"| {need:,.0f} | {over / need:.2f} | {r['decode_tps']:.2f} |")


if __name__ == "__main__":
    main()
