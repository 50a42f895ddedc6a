"""Header-only indexing of safetensors files, shared by the Mistral and Hugging Face layouts.

Tensors are read with plain file reads into fresh tensors rather than through a memory map: pages of a map
that the loader has touched count in the process's resident memory until the kernel reclaims them, so a
quantize-on-load of a 14.5 GB bf16 file would look (and, under a memory limit, be charged) like 14.5 GB more.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from .checkpoint import CheckpointError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(path: Path) -> tuple[dict, int]:
    """(tensor table, byte offset of the data) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise ValueError(f"header of {n} bytes")
        table = json.loads(f.read(n))
    table.pop("__metadata__", None)
    return table, 8 + n


class SafetensorsIndex:
    """Stored name -> (file, shape, dtype), read from headers; tensors are read one at a time on demand."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.entries: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        self._spans: dict[str, tuple[int, int]] = {}
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{path}: file not found")
            try:
                table, start = _header(path)
                size = path.stat().st_size
                for name, e in table.items():
                    begin, end = e["data_offsets"]
                    if e["dtype"] not in _DTYPES or start + end > size or end < begin:
                        raise ValueError(f"tensor {name}: dtype {e['dtype']} at bytes {begin}..{end} of {size}")
                    self.entries[name] = (path, tuple(e["shape"]), e["dtype"])
                    self._spans[name] = (start + begin, end - begin)
            except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e

    def read(self, name: str) -> torch.Tensor:
        path, shape, dtype = self.entries[name]
        offset, nbytes = self._spans[name]
        out = torch.empty(nbytes, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            if nbytes and f.readinto(memoryview(out.numpy())) != nbytes:
                raise OSError(f"short read of {name}")
        return out.view(_DTYPES[dtype]).reshape(shape)
