"""Benchmark files as their publishers ship them: JSON lines (optionally .gz), a JSON list, or parquet.

Records keep their upstream field names; each task says which layouts it accepts, and a file that
matches none fails here, naming the file, the line and the expected fields, rather than as a
KeyError deep in prompt building.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]


class DataError(ValueError):
    """A benchmark file does not have the layout its task expects."""


def read_records(path: str | Path) -> list[tuple[str, Record]]:
    """(where, record) for every record of a .jsonl / .jsonl.gz / .json / .parquet file, in file order;
    `where` ("line 12", "row 3") is what error messages point at."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert to JSONL") from e
        return [(f"row {n}", r) for n, r in enumerate(pq.read_table(path).to_pylist(), 1)]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if path.suffix == ".json" or path.name.endswith(".json.gz"):
        data = json.loads(text)
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of records")
        return [(f"item {n}", r) for n, r in enumerate(data, 1)]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from e
    return records


def load_records(path: str | Path, layouts: Sequence[Sequence[str]], task: str) -> list[Record]:
    """The file's records, after checking each has all the fields of at least one accepted layout."""
    records = read_records(path)
    for where, rec in records:
        if not isinstance(rec, dict) or not any(all(f in rec for f in lay) for lay in layouts):
            want = " or ".join("{" + ", ".join(lay) + "}" for lay in layouts)
            got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{path}: {where}: {task} expects fields {want}; found {got}")
    return [r for _, r in records]
