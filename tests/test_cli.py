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
    (["generate", "hi", "--prefix-cache", "5"], "prefix cache"),
])
def test_bad_input_exits_2_with_a_clear_message(smollm2_path, args, message):
    r = gale(*args)
    assert r.returncode == 2 and "gale: error:" in r.stderr and message in r.stderr, r.stderr


def test_lora_flag_applies_the_adapter(smollm2_path, smollm2_llm, tmp_path):
    import torch

    from gale.llm import load
    from gale.lora import LoraConfig, apply_lora, lora_layers, save_adapter

    llm = load(smollm2_path, device="cpu", dtype="fp32", progress=False, quantized=False)  # LoRA needs fp32
    config = LoraConfig(rank=4, alpha=8, dropout=0.0, targets=("wq", "wv", "w2"))
    torch.manual_seed(0)  # lora_a is drawn at apply time: seed it too, or the answer depends on earlier tests
    apply_lora(llm.model, config)
    with torch.no_grad():
        for layer in lora_layers(llm.model).values():
            layer.lora_b.normal_(0, 0.2)
    save_adapter(tmp_path / "adapter", llm.model, config)
    prompt = "The capital of France is"
    expected = llm.generate(prompt, max_tokens=8).text
    assert expected != smollm2_llm.generate(prompt, max_tokens=8).text  # the adapter really changes the answer
    r = gale("generate", prompt, "--max-tokens", "8", "--lora", str(tmp_path / "adapter"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
