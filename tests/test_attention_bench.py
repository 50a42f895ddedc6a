"""benchmarks/attention.py at tiny size on the CPU with every path the GPU run takes (bf16, FlexAttention rows),
so that run cannot fail on a typo, and its FLOP columns shown to count what each path computes."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["full", "full dense", "SWA", "SWA dense", "full flex", "SWA flex"]


def rows(text: str, first: str) -> dict[tuple[str, str], list[str]]:
    """Table rows whose first cell is `first` (a chunk or a token count): (that, path) -> the other cells."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and re.fullmatch(first, cells[0]):
            out[cells[0], cells[1]] = cells[2:]
    return out


def test_gpu_run_paths_at_tiny_size():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--tokens", "96", "--window", "24",
           "--query-block", "8", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--model-tokens", "96",
           "--model-dim", "64", "--model-hidden", "64", "--model-layers", "1", "--repeats", "1", "--decode-steps", "2",
           "--dtype", "bfloat16", "--flex", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "failed" not in r.stderr, r.stderr[-3000:]
    chunks = rows(r.stdout, r"6|12|24|48")
    assert {(c, p) for c in ("6", "12", "24", "48") for p in PATHS} <= set(chunks)
    saved = {key: float(cells[3].rstrip("x")) for key, cells in chunks.items()}  # full's FLOPs / this path's
    assert saved["48", "SWA"] > 1.5 * saved["48", "SWA dense"]  # bands skip what dense masks
    # FlexAttention computes whole 128 x 128 tiles: at this size one tile row covers [buffer ; chunk], as dense
    assert saved["48", "SWA flex"] == saved["48", "SWA dense"]
    model = rows(r.stdout, r"96")
    assert {("96", p) for p in ["full", "SWA", "SWA dense", "full flex", "SWA flex"]} <= set(model)
