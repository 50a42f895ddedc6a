"""A checkpoint seen through a quantization scheme: each matrix read as the GGUF blocks it would be written in.

`quantized_view(ckpt, "Q8_0")` is a Checkpoint whose `storage` names each tensor's planned GGUF type and whose
`read_blocks` quantizes one tensor when asked (bf16 from the file -> one fp32 tensor -> blocks), so the loader
keeps the blocks in QuantLinear layers exactly as it keeps a GGUF's, and `gale quantize` writes the same
blocks: loading the written file gives the very weights quantize-on-load gives.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..quantize import FORMATS, dequantize, quantize, scheme_name, tensor_type
from .checkpoint import Checkpoint


def planned_types(ckpt: Checkpoint, scheme: str) -> dict[str, str]:
    """Gale name -> GGUF type ("F32", "F16" or a block type) of every tensor under `scheme`."""
    scheme = scheme_name(scheme)
    return {name: tensor_type(name, shape, scheme, ckpt.args.n_layers, ckpt.args.tie_embeddings)
            for name, shape in ckpt.shapes.items()}


def quantized_view(ckpt: Checkpoint, scheme: str) -> Checkpoint:
    """`ckpt` with every matrix in its `scheme` blocks (quantized one tensor at a time, on demand)."""
    types = planned_types(ckpt, scheme)

    def read_blocks(name: str) -> np.ndarray:
        return quantize(ckpt.read(name), types[name])

    def read(name: str) -> torch.Tensor:
        kind = types[name]
        if kind in FORMATS:
            return dequantize(read_blocks(name), kind, ckpt.shapes[name])
        tensor = ckpt.read(name)
        return tensor.half().float() if kind == "F16" else tensor.float()

    return dataclasses.replace(ckpt, storage=types, read=read, read_blocks=read_blocks)
