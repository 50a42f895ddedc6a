"""The official Mistral layout: params.json + consolidated.safetensors (names as the model uses them)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import from_params_json
from .checkpoint import Checkpoint, CheckpointError
from .safetensors_files import SafetensorsIndex


def is_mistral_folder(path: Path) -> bool:
    return (path / "params.json").is_file()


def open_mistral(folder: Path) -> Checkpoint:
    try:
        params = json.loads((folder / "params.json").read_text())
        args = from_params_json(params)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / 'params.json'}: cannot read model parameters ({e!r})") from e
    files = sorted(folder.glob("consolidated*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no consolidated*.safetensors next to params.json "
                              "(the legacy consolidated.00.pth format is not supported)")
    index = SafetensorsIndex(files)
    entries = index.entries
    if args.tie_embeddings:
        entries.pop("output.weight", None)
    return Checkpoint(
        path=folder, format="mistral", args=args,
        shapes={n: e[1] for n, e in entries.items()},
        storage={n: e[2] for n, e in entries.items()},
        files={n: e[0] for n, e in entries.items()},
        read=index.read,
    )
