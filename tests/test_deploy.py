"""The SkyPilot recipes: AWS, GCP and Azure as candidates, and every `gale` command they run parses with
today's command line (run through bash with `gale`/`torchrun` captured, optional flags switched on)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from gale.cli import build_parser

RECIPES = sorted((Path(__file__).parent.parent / "deploy" / "skypilot").glob("*.yaml"))
CAPTURE = """
gale() { python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$CALLS"; }
torchrun() { python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' torchrun "$@" >> "$CALLS"; }
"""


def test_there_are_recipes_for_serving_evaluation_and_fine_tuning():
    assert {p.stem for p in RECIPES} == {"serve", "eval", "finetune"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_targets_three_clouds_and_runs_valid_gale_commands(recipe, tmp_path):
    spec = yaml.safe_load(recipe.read_text())
    assert {c["cloud"] for c in spec["resources"]["any_of"]} == {"aws", "gcp", "azure"}
    assert spec["resources"]["accelerators"] and spec["workdir"] == "."
    for command in ("setup", "run"):
        assert subprocess.run(["bash", "-n"], input=spec[command], text=True).returncode == 0, command
    env = {**os.environ, "CALLS": str(tmp_path / "calls"), "HOME": str(tmp_path), "SKYPILOT_NODE_IPS": "10.0.0.1",
           "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_GPUS_PER_NODE": "8"}
    env.update({k: str(v) if v not in ("", None) else "7" for k, v in spec.get("envs", {}).items()})  # "" -> set
    (tmp_path / "eval-data").mkdir()
    for name in ("mmlu.jsonl", "mmlu_dev.jsonl", "gsm8k.jsonl"):
        (tmp_path / "eval-data" / name).write_text("")
    r = subprocess.run(["bash", "-c", CAPTURE + spec["run"]], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
    assert len(calls) == 1
    argv = calls[0]
    if argv[0] == "torchrun":
        assert argv[argv.index("-m") + 1] == "gale.cli"
        argv = argv[argv.index("-m") + 2 :]
    args = build_parser().parse_args(argv)  # exits (SystemExit) on any flag the CLI does not have
    assert args.command == recipe.stem and args.device == "cuda" and args.dtype == "bf16"
    if recipe.stem == "eval":
        assert "mmlu=" + str(tmp_path / "eval-data" / "mmlu.jsonl") in args.data
        assert "mmlu=" + str(tmp_path / "eval-data" / "mmlu_dev.jsonl") in args.fewshot


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_skypilot_accepts_the_recipe(recipe):
    sky = pytest.importorskip("sky", reason="skypilot is not installed (pip install skypilot)")
    task = sky.Task.from_yaml(str(recipe))
    assert task.run and task.setup
