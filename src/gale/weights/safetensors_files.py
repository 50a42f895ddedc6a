"""Header-only indexing of safetensors files, shared by the Mistral and Hugging Face layouts."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import CheckpointError


class SafetensorsIndex:
    """Stored name -> (file, shape, dtype), read from headers; tensors are read one at a time on demand."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.entries: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        self._handles = {}
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{path}: file not found")
            try:
                handle = safe_open(str(path), framework="pt")
                for name in handle.keys():
                    s = handle.get_slice(name)
                    self.entries[name] = (path, tuple(s.get_shape()), s.get_dtype())
            except Exception as e:  # noqa: BLE001 - truncated or corrupt files raise library-specific errors
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
            self._handles[path] = handle

    def read(self, name: str) -> torch.Tensor:
        return self._handles[self.entries[name][0]].get_tensor(name)
