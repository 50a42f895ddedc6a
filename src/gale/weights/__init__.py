"""Checkpoints in the three layouts users have -> one Transformer, streamed tensor by tensor.

Layouts: the official Mistral folder (params.json + consolidated.safetensors), a Hugging Face folder
(config.json + model.safetensors or shards) and a GGUF file. Each is opened into a `Checkpoint` (header only),
validated against the model's parameters, then copied one tensor at a time into a model allocated once in the
target dtype on the target device, so peak memory stays near one copy of the model.
"""

from __future__ import annotations

import json
import sys
import unittest.mock
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import ModelArgs, to_hf_config, to_params_json
from ..gguf_lib import GGMLQuantizationType
from ..model import Transformer
from .checkpoint import Checkpoint, CheckpointError
from .gguf import open_gguf
from .hf import is_hf_folder, open_hf, to_hf
from .mistral import is_mistral_folder, open_mistral
from .quantized import quantized_view

T = TypeVar("T")

GGML_TYPES = frozenset(t.name for t in GGMLQuantizationType)

__all__ = ["Checkpoint", "CheckpointError", "describe_checkpoint", "load_model", "model_shapes", "open_checkpoint",
           "quantized_view", "save_hf", "save_mistral", "write_gguf"]


def __getattr__(name: str) -> Any:
    """`write_gguf` on first use: the GGUF writer imports all of `gguf` (gale.gguf_lib), which loading does not need."""
    if name == "write_gguf":
        from .export import write_gguf

        return write_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a Mistral folder, a Hugging Face folder or a .gguf file, reading headers only."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: a file must be a .gguf; pass the folder of a safetensors checkpoint")
        return open_gguf(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    if is_mistral_folder(path):
        return open_mistral(path)
    if is_hf_folder(path):
        return open_hf(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return open_gguf(ggufs[0])
    raise CheckpointError(f"{path}: neither params.json (Mistral layout), config.json (Hugging Face layout) "
                          "nor a single .gguf file")


def load_model(checkpoint: str | Path | Checkpoint, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, progress: bool = True, keep_quantized: bool = False,
               quantize: str | None = None) -> Transformer:
    """Build the model of a checkpoint and fill it; raises CheckpointError before any weight is copied
    when names, shapes or types do not match, and never returns a half-loaded model.

    `keep_quantized`: the linear layers (and token embeddings) of a GGUF whose blocks have a kernel
    (`gale.quant.KINDS`) stay in those blocks (`gale.quant.QuantLinear`, CPU fp32 inference only); other
    tensors are dequantized, and the load says which.
    `quantize`: a scheme of `gale.quantize.SCHEMES` (e.g. "Q8_0", "q4_k"): each matrix is quantized as it is
    read (one fp32 tensor in flight, never the fp32 model) and kept as above.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    if quantize is not None:
        if str(device) != "cpu" or dtype != torch.float32:
            raise ValueError(f"quantize={quantize!r} runs on the CPU kernels in fp32, not on {device} in {dtype}")
        ckpt, keep_quantized = quantized_view(ckpt, quantize), True
    model = meta_model(ckpt.args).to(dtype)
    ckpt.validate({n: tuple(p.shape) for n, p in model.named_parameters()})
    on_kernels = keep_quantized and str(device) == "cpu" and dtype == torch.float32
    quantized = _keep_quantized(model, ckpt, progress, "quantizing" if quantize else "mapping") if on_kernels else set()
    model = _to_empty(model, device)
    params = dict(model.named_parameters())
    names = [n for n in ckpt.names() if n not in quantized]
    with torch.no_grad():
        for name, tensor in _progress(ckpt.tensors(names), len(names), f"loading {ckpt.path.name}", progress):
            params[name].copy_(tensor)
    if quantized:
        from ..quant import DecodeKernel

        if DecodeKernel.supports(model):
            model.decode_kernel = DecodeKernel(model)
    return model.eval().requires_grad_(False)


def meta_model(args: ModelArgs) -> Transformer:
    """The model of `args` on the meta device (no memory), its random initialization skipped: every weight is
    about to be read, nn.Embedding's `normal_` on a meta tensor costs a first-call import of torch's Python
    decompositions (~1.5 s of every load), and nn.Linear's on meta tensors half of the default model's 15 ms
    skeleton."""
    with torch.device("meta"), unittest.mock.patch.object(torch.nn.init, "normal_", lambda t, *_, **__: t), \
            unittest.mock.patch.object(nn.Linear, "reset_parameters", lambda self: None):
        return Transformer(args)


def _to_empty(model: Transformer, device: str | torch.device) -> Transformer:
    """`model.to_empty(device)` without torch's `empty_like` of meta tensors, whose first call imports sympy
    (0.4 s of a 0.85 s 7B load). Parameters shared between modules stay shared."""
    made: dict[int, torch.Tensor] = {}

    def empty(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            new = torch.empty(t.shape, dtype=t.dtype, device=device)
            made[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        return made[id(t)]

    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and t.is_meta:
                    table[name] = empty(t)
    return model


def model_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the model of `args` (built on the meta device: no memory)."""
    return {n: tuple(p.shape) for n, p in meta_model(args).named_parameters()}


def _progress(items: Iterable[T], total: int, desc: str, show: bool) -> Iterable[T]:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="tensor", leave=False)


def _keep_quantized(model: Transformer, ckpt: Checkpoint, progress: bool = False, verb: str = "mapping") -> set[str]:
    """Swap each linear layer whose GGUF blocks have a kernel for a QuantLinear over those blocks, and the
    token embeddings for a row lookup in theirs (a tied output projection's, or their own).

    Block types without a kernel are left to the caller, which dequantizes them; one line names them.
    Returns the swapped weight names.
    """
    from ..quant import KINDS, QuantEmbedding, QuantLinear, kernels

    if ckpt.read_blocks is None or kernels() is None:
        return set()
    modules = {f"{n}.weight": n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    modules["tok_embeddings.weight"] = "output" if model.output is None else "tok_embeddings"
    chosen = [w for w in modules if ckpt.storage.get(w) in KINDS]
    _say_unkerneled({w: ckpt.storage.get(w, "") for w in modules if w not in chosen})
    swapped = set()
    for weight in _progress(chosen, len(chosen), f"{verb} {ckpt.path.name}", progress):
        out_features, in_features = ckpt.shapes[weight]
        layer = QuantLinear.from_gguf(ckpt.storage[weight], ckpt.read_blocks(weight), out_features, in_features)
        if weight == "tok_embeddings.weight":
            model.tok_embeddings = QuantEmbedding(layer)
        module_name = modules[weight]
        if module_name != "tok_embeddings":
            parent, _, attr = module_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, layer)
        swapped.add(weight)
    return swapped


def _say_unkerneled(kinds: dict[str, str]) -> None:
    """One console line naming the block types (and tensors) that load as fp32 for want of a kernel."""
    blocks = {w: k for w, k in kinds.items() if k in GGML_TYPES and k not in ("F32", "F16", "BF16", "F64")}
    if not blocks:
        return
    by_kind: dict[str, list[str]] = {}
    for w, k in blocks.items():
        by_kind.setdefault(k, []).append(w)
    parts = [f"{k} ({ws[0]}{f' and {len(ws) - 1} more' if len(ws) > 1 else ''})" for k, ws in by_kind.items()]
    print(f"gale: no CPU kernel for {', '.join(parts)}: dequantized to fp32", file=sys.stderr)


def describe_checkpoint(ckpt: Checkpoint) -> str:
    """e.g. `gguf, 138.1 MB: Q4_1 x 210, F32 x 61, Q8_0 x 1`."""
    counts = Counter(ckpt.storage.values()).most_common()
    return f"{ckpt.format}, {ckpt.nbytes / 1e6:,.1f} MB: " + ", ".join(f"{k} x {n}" for k, n in counts)


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_mistral(folder: str | Path, state: Mapping[str, torch.Tensor], args: ModelArgs) -> Path:
    """Write the official layout: params.json + consolidated.safetensors (Gale names are Mistral's)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(to_params_json(args), indent=2))
    save_file(_contiguous(state), str(folder / "consolidated.safetensors"))
    return folder


def save_hf(folder: str | Path, state: Mapping[str, torch.Tensor], args: ModelArgs, *,
            max_shard_bytes: int | None = None) -> Path:
    """Write a Hugging Face folder that transformers loads as MistralForCausalLM (sharded past max_shard_bytes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(to_hf_config(args), indent=2))
    hf_state = dict(to_hf(k, v, args) for k, v in _contiguous(state).items())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in hf_state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder
