"""Checkpoints in the three layouts users have -> one Transformer, streamed tensor by tensor.

Layouts: the official Mistral folder (params.json + consolidated.safetensors), a Hugging Face folder
(config.json + model.safetensors or shards) and a GGUF file. Each is opened into a `Checkpoint` (header only),
validated against the model's parameters, then copied one tensor at a time into a model allocated once in the
target dtype on the target device, so peak memory stays near one copy of the model.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelArgs, to_hf_config, to_params_json
from ..model import Transformer
from .checkpoint import Checkpoint, CheckpointError
from .gguf import open_gguf
from .hf import is_hf_folder, open_hf, to_hf
from .mistral import is_mistral_folder, open_mistral

__all__ = ["Checkpoint", "CheckpointError", "describe_checkpoint", "load_model", "open_checkpoint", "save_hf",
           "save_mistral"]


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
               dtype: torch.dtype = torch.float32, progress: bool = True, keep_quantized: bool = False) -> Transformer:
    """Build the model of a checkpoint and fill it; raises CheckpointError before any weight is copied
    when names, shapes or types do not match, and never returns a half-loaded model.

    `keep_quantized`: the linear layers of a GGUF whose blocks have a kernel (Q4_0, Q4_1, Q8_0) stay in
    those blocks (`gale.quant.QuantLinear`, CPU fp32 inference only); other tensors are dequantized.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    with torch.device("meta"):
        model = Transformer(ckpt.args).to(dtype)
    ckpt.validate({n: tuple(p.shape) for n, p in model.named_parameters()})
    quantized = _keep_quantized(model, ckpt) if keep_quantized and str(device) == "cpu" and \
        dtype == torch.float32 else set()
    model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    names = [n for n in ckpt.names() if n not in quantized]
    tensors = ckpt.tensors(names)
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, total=len(names), desc=f"loading {ckpt.path.name}", unit="tensor", leave=False)
    with torch.no_grad():
        for name, tensor in tensors:
            params[name].copy_(tensor)
    if quantized:
        from ..quant import DecodeKernel

        if DecodeKernel.supports(model):
            model.decode_kernel = DecodeKernel(model)
    return model.eval().requires_grad_(False)


def _keep_quantized(model: Transformer, ckpt: Checkpoint) -> set[str]:
    """Swap each linear layer whose GGUF blocks have a kernel for a QuantLinear over those blocks.

    A tied output projection gets a QuantLinear over the embedding's blocks, and the embedding becomes a
    row lookup in those same blocks. Returns the swapped weight names.
    """
    from ..quant import KINDS, QuantEmbedding, QuantLinear, kernels

    if ckpt.read_blocks is None or kernels() is None:
        return set()
    modules = {f"{n}.weight": n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if model.output is None:
        modules["tok_embeddings.weight"] = "output"
    swapped = set()
    for weight, module_name in modules.items():
        kind = ckpt.storage.get(weight)
        if kind not in KINDS:
            continue
        out_features, in_features = ckpt.shapes[weight]
        layer = QuantLinear.from_gguf(kind, ckpt.read_blocks(weight), out_features, in_features)
        parent, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
        if weight == "tok_embeddings.weight":
            model.tok_embeddings = QuantEmbedding(layer)
        swapped.add(weight)
    return swapped


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
