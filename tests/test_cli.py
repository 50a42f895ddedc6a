"""The `gale` command line, run as users run it; the README's quickstart commands are run by .ci/run."""

import subprocess
import sys

import pytest

from gale.cli import main


def gale(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gale.cli", *args], capture_output=True, text=True, input=input,
                          timeout=300)


def test_info_describes_the_default_model(smollm2_path, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for expected in ("gguf", "Q4_1", "30 / 576 / 1536", "9 / 3 / 64", "sliding window", "none", "HFTokenizer"):
        assert expected in out, out


def test_chat_one_shot_answers(smollm2_path):
    r = gale("chat", "What is the capital of France?", "--max-tokens", "20")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_interactive_chat_keeps_history_and_resets(smollm2_path):
    script = "My name is Ada. Reply OK.\nWhat is my name?\n/reset\n/exit\n"
    r = gale("chat", "--max-tokens", "12", input=script)
    assert r.returncode == 0, r.stderr
    assert "Ada" in r.stdout.split("What is my name?")[-1] or "Ada" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--top-p", "2"], "top_p"),
    (["generate", "", "--max-tokens", "3"], "empty"),
    (["info", "/no/such/model"], "no such file"),
])
def test_bad_input_exits_2_with_a_clear_message(smollm2_path, args, message):
    r = gale(*args)
    assert r.returncode == 2 and "gale: error:" in r.stderr and message in r.stderr, r.stderr
