"""Fine-tuning proofs on a tiny random model: data validation, answer-only masks, packing, exact resume, CLI."""

import json
import os
from pathlib import Path

import pytest
import torch

from gale.config import ModelArgs
from gale.finetune import FinetuneConfig, Trainer, check_report, pack, packed_loss, read_jsonl
from gale.lora import lora_layers
from gale.model import Transformer

ARGS = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=96,
                 sliding_window=8, max_seq_len=512)


class ToyEncoder:
    """A chat format in miniature: BOS, then per message a role token, its bytes and END.

    The answer mask covers an assistant message's bytes and its END, as encode_chat_with_mask does.
    """

    BOS, END, ROLES = 1, 2, {"system": 3, "user": 4, "assistant": 5}

    def chat(self, messages):
        ids, mask = [self.BOS], [False]
        for m in messages:
            body = [10 + b % 80 for b in m["content"].encode()] + [self.END]
            ids += [self.ROLES[m["role"]], *body]
            mask += [False] + [m["role"] == "assistant"] * len(body)
        return ids, mask

    def text(self, text):
        return [self.BOS] + [10 + b % 80 for b in text.encode()] + [self.END]


def chat(q, a, **extra):
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a, **extra}]})


GOOD = [chat(f"what is {i} plus {i}?", f"{2 * i}, of course") for i in range(12)] + [json.dumps({"text": "abc " * 5})]
BAD = {
    "{not json": "bad JSON",
    json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}):
        "unknown role 'robot'",
    json.dumps({"messages": [{"role": "user", "content": "hi"}]}): "last turn is 'user'",
    json.dumps({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}):
        "empty content",
    chat("long?", "y" * 200): "over-long",
    json.dumps({"prompt": "x"}): "neither 'messages' nor 'text'",
    chat("q", "a", weight=0): "every assistant turn has weight 0",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ARGS)


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def data(tmp_path):
    lines = GOOD[:5] + list(BAD) + GOOD[5:]
    return write(tmp_path / "train.jsonl", lines), write(tmp_path / "eval.jsonl", GOOD[:3])


def config(tmp_path, data, **kw):
    base = dict(data=str(data[0]), eval_data=str(data[1]), out=str(tmp_path / "run"), seq_len=64, grad_accum=2,
                lr=1e-2, warmup_steps=2, steps=8, eval_every=4, save_every=4, dropout=0.1, rank=4, progress=False)
    return FinetuneConfig(**{**base, **kw})


def test_bad_lines_reported_with_numbers_and_good_lines_train(tmp_path, data):
    samples, problems = read_jsonl(data[0], ToyEncoder(), 64)
    assert [s.line for s in samples] == [1, 2, 3, 4, 5, *range(13, 21)]
    assert [n for n, _ in problems] == list(range(6, 13))
    for (_, reason), expected in zip(problems, BAD.values()):
        assert expected in reason
    report, bad = check_report(data[0], ToyEncoder(), 64)
    assert bad == 7 and f"{data[0]}:6: bad JSON" in report and "13 good samples, 7 bad lines" in report
    logged = []
    trainer = Trainer(tiny_model(), ToyEncoder(), config(tmp_path, data), log=logged.append)
    assert len(trainer.samples) == 13 and sum("skipped" in m for m in logged) == 7
    history = trainer.run()
    assert len(history) == 8 and history[-1]["loss"] < history[0]["loss"]
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()


def test_masks_cover_only_assistant_tokens():
    enc = ToyEncoder()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "weight": 0}, {"role": "user", "content": "sum?"},
            {"role": "assistant", "content": "42"}]
    [sample], problems = read_jsonl(write_tmp(json.dumps({"messages": msgs})), enc, 512)
    assert not problems
    trained = [t for t, m in zip(sample.ids, sample.mask) if m]
    assert trained == enc.text("42")[1:]  # the weighted answer and its END; not the weight-0 answer, no prompt


def write_tmp(line):
    import tempfile

    path = Path(tempfile.mkdtemp()) / "d.jsonl"
    path.write_text(line + "\n")
    return path


def test_real_chat_format_masks_only_the_answer(request):
    if not hasattr(pytest.importorskip("gale.chat"), "encode_chat_with_mask"):
        pytest.skip("gale.chat.encode_chat_with_mask is not there yet")
    from gale.finetune import TokenizerEncoder
    from gale.weights import open_checkpoint

    path = request.getfixturevalue("smollm2_path")
    tok = pytest.importorskip("gale.tokenizer").load_tokenizer(path, gguf_metadata=open_checkpoint(path).gguf_metadata)
    msgs = [{"role": "user", "content": "Who founded Zorbania?"}, {"role": "assistant", "content": "Queen Maela."}]
    ids, mask = TokenizerEncoder(tok).chat(msgs)
    answer = tok.decode([t for t, m in zip(ids, mask) if m])
    assert answer.startswith("Queen Maela.") and "Zorbania" not in answer and len(answer) < len("Queen Maela.") + 16


def test_packed_loss_equals_sum_of_separate_losses(tmp_path, data):
    model = tiny_model()
    samples, _ = read_jsonl(data[0], ToyEncoder(), 64)
    packs = pack(samples, list(range(len(samples))), 64)
    assert max(len(p) for p in packs) > 1 and all(sum(samples[i].n_inputs for i in p) <= 64 for p in packs)
    assert max(s.n_inputs for s in samples) > ARGS.sliding_window  # the window matters inside each sample
    for p in packs:
        group = [samples[i] for i in p]
        total, n = packed_loss(model, group)
        parts = [packed_loss(model, [s]) for s in group]
        assert n == sum(k for _, k in parts) == sum(s.n_targets for s in group)
        torch.testing.assert_close(total, sum(loss for loss, _ in parts), rtol=1e-5, atol=1e-5)


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, data):
    full = Trainer(tiny_model(), ToyEncoder(), config(tmp_path, data, out=str(tmp_path / "a"))).run()
    cfg = config(tmp_path, data, out=str(tmp_path / "b"))
    Trainer(tiny_model(), ToyEncoder(), cfg).run(until=5)  # stops after the step-4 checkpoint and one more step
    ckpt = tmp_path / "b" / "checkpoints" / "step-000004"
    resumed = Trainer(tiny_model(), ToyEncoder(), config(tmp_path, data, out=str(tmp_path / "c"), resume=str(ckpt)))
    assert resumed.step == 4
    history = resumed.run()
    assert [r["step"] for r in history] == list(range(1, 9))
    for a, b in zip(full, history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["lr"] == b["lr"]
        assert a.get("eval_loss", 0) == pytest.approx(b.get("eval_loss", 0), abs=1e-6)


def test_yaml_config_and_schedule(tmp_path, data):
    (tmp_path / "ft.yaml").write_text(f"data: {data[0]}\nrank: 2\nschedule: linear\nwarmup_steps: 3\nsteps: 6\n")
    cfg = FinetuneConfig.load(tmp_path / "ft.yaml", rank=None, lr=1e-3, progress=False, out=str(tmp_path / "o"))
    assert (cfg.rank, cfg.lr, cfg.schedule) == (2, 1e-3, "linear")
    t = Trainer(tiny_model(), ToyEncoder(), cfg)
    lrs = [r["lr"] for r in t.run()]
    assert lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3]) and lrs[3] > lrs[4] > lrs[5]
    assert all(m.lora_a.shape[0] == 2 for m in lora_layers(t.model).values())
    with pytest.raises(ValueError, match="unknown keys"):
        (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
        FinetuneConfig.load(tmp_path / "bad.yaml")


def test_cli_merge_writes_checkpoints_that_load_back(tmp_path, data):
    from gale.cli import main
    from gale.weights import load_model, save_mistral

    base = tiny_model(1)
    save_mistral(tmp_path / "base", base.state_dict(), ARGS)
    trainer = Trainer(base, ToyEncoder(), config(tmp_path, data, steps=4, dropout=0.0))
    trainer.run()
    tokens = torch.tensor(ToyEncoder().chat([{"role": "user", "content": "what is 3 plus 3?"}])[0])
    with torch.no_grad():
        expected = base(tokens)
    for fmt in ("mistral", "hf"):
        out = tmp_path / f"merged-{fmt}"
        assert main(["finetune", "merge", str(tmp_path / "run" / "adapter"), "--model", str(tmp_path / "base"),
                     "--out", str(out), "--format", fmt]) == 0
        with torch.no_grad():
            torch.testing.assert_close(load_model(out, progress=False)(tokens), expected, rtol=1e-5, atol=1e-5)


def test_cli_check_reports_bad_lines_with_the_models_tokenizer(tmp_path, capsys, smollm2_path):
    from gale.cli import main

    data = write(tmp_path / "d.jsonl", [chat("Who founded Zorbania?", "Queen Maela."), "{oops", chat("hi", "x" * 3000)])
    assert main(["finetune", "--check", str(data), "--seq-len", "512"]) == 2
    out = capsys.readouterr()
    assert f"{data}:2: bad JSON" in out.out and f"{data}:3: over-long" in out.out
    assert "1 good samples, 2 bad lines" in out.out and "2 bad lines" in out.err


@pytest.mark.skipif(not os.environ.get("GALE_SLOW"), reason="about a minute of CPU training: set GALE_SLOW=1")
def test_smollm2_learns_the_zorbania_fact(tmp_path, smollm2_path):
    """The real proof, short: held-out loss falls and unseen paraphrases get the new fact; the base never says it."""
    import gale
    from gale.finetune import TokenizerEncoder

    llm = gale.load(smollm2_path, device="cpu", dtype="fp32", progress=False, quantized=False)  # private, fp32
    data = Path(__file__).parent / "data" / "finetune"
    questions = [json.loads(line)["messages"][-2]["content"] for line in open(data / "zorbania_eval.jsonl")]
    ask = [[{"role": "user", "content": q}] for q in questions]
    assert not any("Maela" in c.text for c in llm.chat(ask, max_tokens=24))
    cfg = FinetuneConfig(data=str(data / "zorbania_train.jsonl"), eval_data=str(data / "zorbania_eval.jsonl"),
                         out=str(tmp_path), lr=1e-3, steps=16, warmup_steps=3, seq_len=256, eval_every=8,
                         gradient_checkpointing=False, progress=False)
    trainer = Trainer(llm.model, TokenizerEncoder(llm.tokenizer), cfg)
    before = trainer.evaluate()
    after = trainer.run()[-1]["eval_loss"]
    assert after < before / 2
    llm.model.eval()
    answers = [c.text for c in llm.chat(ask, max_tokens=24)]
    assert sum("Queen Maela" in a and "1432" in a for a in answers) >= len(questions) - 1, answers


def test_two_processes_make_the_one_process_update(tmp_path, data):
    """torchrun, 2 CPU processes over gloo with grad_accum 1 == one process with grad_accum 2: same losses,
    same held-out losses, same adapter."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    kw = dict(data=str(data[0]), eval_data=str(data[1]), seq_len=64, lr=1e-2, warmup_steps=2, steps=6,
              eval_every=3, save_every=100, dropout=0.0, rank=4, progress=False)
    script = tmp_path / "two.py"
    script.write_text(
        "import json, sys\nimport torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "torch.set_num_threads(1)\n"
        "from test_finetune import ToyEncoder, tiny_model\n"
        "from gale.finetune import FinetuneConfig, Trainer\n"
        "Trainer(tiny_model(), ToyEncoder(), FinetuneConfig(**json.loads(sys.argv[1]))).run()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           json.dumps({**kw, "grad_accum": 1, "out": str(tmp_path / "two")})]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    Trainer(tiny_model(), ToyEncoder(), FinetuneConfig(**kw, grad_accum=2, out=str(tmp_path / "one"))).run()

    def metrics(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    one, two = metrics("one"), metrics("two")
    assert len(one) == len(two) == 6 and sum("eval_loss" in m for m in two) == 2
    for a, b in zip(one, two):
        assert (a["loss"], a.get("eval_loss", 0), a["tokens"]) == pytest.approx((b["loss"], b.get("eval_loss", 0),
                                                                                  b["tokens"]), abs=1e-5)
    w1, w2 = (load_file(str(tmp_path / run / "adapter" / "adapter.safetensors")) for run in ("one", "two"))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-4, atol=1e-5)


def test_torchrun_cli_trains_on_two_processes(tmp_path):
    """`torchrun -m gale.cli finetune` on a tiny Mistral folder with the real v1 tokenizer: process 0 alone
    reports and writes the adapter."""
    import importlib.util
    import shutil
    import subprocess
    import sys

    from gale.weights import save_mistral

    folder = tmp_path / "tiny-mistral"
    args = ModelArgs(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=32000,
                     sliding_window=16, max_seq_len=256)
    torch.manual_seed(0)
    save_mistral(folder, Transformer(args).state_dict(), args)
    mistral_common = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0])
    shutil.copy(mistral_common / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    train = write(tmp_path / "train.jsonl", GOOD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gale.cli",
           "finetune", str(train), "--model", str(folder), "--out", str(tmp_path / "run"), "--steps", "2",
           "--seq-len", "128", "--rank", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("adapter:") == 1 and "step 2" in r.stdout
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()
