"""What every checkpoint format is reduced to: Gale tensor names, their shapes, and a reader."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelArgs


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file (and tensor) at fault."""


@dataclass
class Checkpoint:
    """An opened, not yet loaded, checkpoint.

    `shapes` and `storage` come from file headers only (no tensor data is read), so a checkpoint can be
    described and validated before any memory is committed. `read(name)` returns one tensor in Gale's
    layout (names and interleaved RoPE rows), dequantized if needed.
    """

    path: Path
    format: str  # "mistral" | "hf" | "gguf"
    args: ModelArgs
    shapes: dict[str, tuple[int, ...]]
    storage: dict[str, str]  # Gale name -> stored dtype or GGUF quantization type
    files: dict[str, Path]  # Gale name -> file holding it (for error messages)
    read: Callable[[str], torch.Tensor]
    read_blocks: Callable[[str], Any] | None = None  # GGUF: a tensor's raw quantized blocks, [rows, bytes]
    gguf_metadata: dict[str, Any] | None = None
    unsupported: dict[str, str] = field(default_factory=dict)  # Gale name -> why it cannot be read
    ignored: tuple[str, ...] = ()  # stored names that are not weights (e.g. rotary inv_freq buffers)

    def names(self) -> list[str]:
        return list(self.shapes)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))

    def validate(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Check names, shapes and types against the model's parameters before anything is loaded."""
        where = f"{self.path}"
        missing = sorted(set(expected) - set(self.shapes))
        if missing:
            raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing[:5])}"
                                  + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        unexpected = sorted(set(self.shapes) - set(expected))
        if unexpected:
            raise CheckpointError(f"{self.files[unexpected[0]]}: unexpected tensor(s) {', '.join(unexpected[:5])}")
        for name, shape in expected.items():
            if tuple(self.shapes[name]) != tuple(shape):
                raise CheckpointError(f"{self.files[name]}: tensor {name} has shape {tuple(self.shapes[name])}, "
                                      f"the model args need {tuple(shape)}")
        for name, why in self.unsupported.items():
            raise CheckpointError(f"{self.files[name]}: tensor {name}: {why}")

    def tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.shapes if names is None else names:
            try:
                yield name, self.read(name)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{self.files[name]}: cannot read tensor {name}: {e}") from e
