"""gale.eval: scores against direct forwards, answer rules on crafted strings, resumable runs, data errors."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gale.config import ModelArgs
from gale.eval.data import DataError
from gale.eval.metrics import (
    choice_metrics,
    exact_match,
    extract_gsm8k,
    extract_math,
    last_boxed,
    majority,
    normalize_answer,
    normalize_math,
)
from gale.eval.report import PAPER
from gale.eval.runner import ResultCache, Settings, encode_pair, evaluate_task, perplexity, run_eval
from gale.eval.tasks import TASKS, load_requests
from gale.model import Transformer

DATA = Path(__file__).parent / "data" / "eval"


class ByteTokenizer:
    """UTF-8 bytes as ids; BOS is 256."""

    bos_id, eos_id, chat_template, add_bos = 256, 257, None, True  # no template: chats use the Mistral format

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        return [self.bos_id] * (self.add_bos if bos is None else bos) + list(text.encode())

    def id_to_piece(self, token_id: int) -> str:
        return {256: "<s>", 257: "</s>"}.get(token_id, chr(token_id))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode()


class FakeLM:
    """A tiny random Transformer for scoring, and scripted generation: answer(prompt, seed) -> text."""

    def __init__(self, answer=lambda prompt, seed: "", fail_after: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = Transformer(ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4,
                                           n_kv_heads=2, vocab_size=260, sliding_window=8, max_seq_len=512)).eval()
        with torch.no_grad():  # the constructor leaves weights uninitialised: denormals would make CPU math crawl
            for p in self.model.parameters():
                p.normal_(0, 0.3)
        self.tokenizer = ByteTokenizer()
        self.answer, self.fail_after, self.prompts = answer, fail_after, []

    def generate(self, prompts, max_tokens=16, temperature=0.0, seed=None, stop=()):
        if self.fail_after is not None and len(self.prompts) >= self.fail_after:
            raise RuntimeError("interrupted")
        self.prompts.append(list(prompts))
        texts = [self.answer(p, seed) for p in prompts]
        return [SimpleNamespace(text=t, token_ids=self.tokenizer.encode(t, bos=False)) for t in texts]

    def generate_ids(self, prompts, **sampling):
        self.stops = sampling.get("stop")
        return self.generate([self.tokenizer.decode(p) for p in prompts], **sampling)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def direct_logprob(model: Transformer, ctx: list[int], cont: list[int]) -> float:
    ids = ctx + cont
    with torch.no_grad():
        lp = model(torch.tensor(ids[:-1])).log_softmax(-1)
    return float(lp[len(ctx) - 1 :].gather(1, torch.tensor(cont)[:, None]).sum())


# -- answer rules --------------------------------------------------------------------------------------------
def test_choice_metrics_by_hand():
    # totals -1 (1 char) and -2 (5 chars): raw prefers 0, per character (-1 vs -0.4) prefers 1
    assert choice_metrics([-1.0, -2.0], ["a", "bbbbb"], 1) == {"acc": 0.0, "acc_norm": 1.0}
    assert choice_metrics([-1.0, -2.0], ["a", "bbbbb"], 0) == {"acc": 1.0, "acc_norm": 0.0}


def test_exact_match_normalisation():
    assert normalize_answer("  The Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert exact_match("the Pacific.", ["Atlantic", "Pacific"])
    assert not exact_match("Pacific Ocean", ["Pacific"])
    assert not exact_match("", [""])


def test_gsm8k_extraction():
    assert extract_gsm8k("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert extract_gsm8k("So 2 * 1,000 = 2,000.\nThe answer is $2,000.") == "2000"
    assert extract_gsm8k("It costs 12.50 then 3.0") == "3.0"  # compared as text, as lm-eval does
    assert extract_gsm8k("#### 0.5") == "0.5"
    assert extract_gsm8k("no digits here") is None
    assert extract_gsm8k("#### 72 (that is 8 packs of 9)") == "72"  # the '#### N' number, not the line's last
    assert extract_gsm8k("#### 123,456,789,012,345,678,901") == "123456789012345678901"  # no float on the way


def test_math_extraction_and_normalisation():
    assert last_boxed(r"so $\boxed{\frac{3}{4}}$ and not \boxed{1}") == "1"
    assert last_boxed(r"$x = \boxed{\frac{a}{b^{2}}}$") == r"\frac{a}{b^{2}}"
    assert last_boxed(r"\boxed 5$") == "5"
    assert last_boxed("nothing") is None
    assert extract_math(r"Thus $\boxed{\dfrac{3}{4}}$.") == r"\frac{3}{4}"
    assert extract_math("Final Answer: The final answer is $5$. I hope it is correct.") == "5"
    assert normalize_math(r"\left( 1, 2 \right)") == "(1,2)"
    assert normalize_math(r"90^\circ") == normalize_math("90")
    assert normalize_math("x = 3/4") == r"\frac{3}{4}"
    assert normalize_math(r"\frac12") == r"\frac{1}{2}" == normalize_math("0.5")
    assert normalize_math(r"5\text{ cm}") == "5"
    assert normalize_math(r"5\text{ apples}") == "5" != normalize_math(r"5\text{apples}")  # Hendrycks' unit rule
    assert normalize_math(r"\sqrt3") == r"\sqrt{3}" == normalize_math(r"\sqrt{3}")
    assert last_boxed(r"\boxed 5 so {x}") == "5 so {x}"  # '\boxed ' up to '$', as Hendrycks' code reads it


def test_majority_vote():
    assert majority(["3", None, "4", "4", "3", "4"]) == "4"
    assert majority(["5", "6", "6", "5"]) == "5"  # a tie goes to the answer seen first
    assert majority([None, None]) is None


# -- data --------------------------------------------------------------------------------------------------
def test_prompts_follow_upstream_layouts():
    mmlu = load_requests(TASKS["mmlu"], DATA / "mmlu.jsonl", fewshot=DATA / "mmlu_dev.jsonl")
    ctx = mmlu[2].options[0][0]  # astronomy: only the astronomy dev example is a shot
    assert ctx.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    assert "What is the Sun?" in ctx and "1 + 1" not in ctx and ctx.endswith("D. Mars\nAnswer:")
    assert [x for _, x in mmlu[0].options] == [" A", " B", " C", " D"] and mmlu[0].label == 1
    wino = load_requests(TASKS["winogrande"], DATA / "winogrande.jsonl")[1]
    assert wino.options[1] == ("The trophy does not fit into the suitcase because the suitcase", " is too small.")
    assert wino.label == 1
    arc_ai2 = load_requests(TASKS["arc_easy"], DATA / "arc_easy.jsonl")
    arc_hf = load_requests(TASKS["arc_challenge"], DATA / "arc_challenge.jsonl")
    assert arc_ai2[1].label == 0 and arc_hf[1].label == 2 and arc_hf[1].options[2][1] == " carbon dioxide"
    hs = load_requests(TASKS["hellaswag"], DATA / "hellaswag.jsonl")[0]
    assert hs.options[0][1] == " puts the dough on a tray. and bakes it."
    qa = load_requests(TASKS["triviaqa"], DATA / "triviaqa.jsonl", limit=1)
    assert len(qa) == 1 and qa[0].golds == ("Iron", "Fe", "Iron metal")
    # without a few-shot file, examples come from the other records, never the evaluated one
    assert qa[0].prompt.count("Q: ") == 3 and qa[0].prompt.endswith("Q: Which metal has the chemical symbol Fe?\nA:")
    gsm = load_requests(TASKS["gsm8k"], DATA / "gsm8k.jsonl", shots=0)
    assert gsm[2].golds == ("2000",) and gsm[2].prompt.startswith("Question: Sara")


@pytest.mark.parametrize("task, line, expect", [
    ("hellaswag", '{"ctx": "x", "endings": ["a"]}', "hellaswag expects fields {ctx, endings, label}"),
    ("winogrande", '{"sentence": "a _ b", "option1": "x", "option2": "y"}', "option1, option2, answer"),
    ("mmlu", '{"question": "q", "options": ["a"], "answer": 0}', "found ['answer', 'options', 'question']"),
])
def test_bad_file_names_fields_and_line(tmp_path, task, line, expect):
    good = (DATA / f"{task}.jsonl").read_text().splitlines()[0]
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(DataError, match="line 2") as e:
        load_requests(TASKS[task], path)
    assert expect in str(e.value)


def test_bad_nested_fields_and_formats(tmp_path):
    arc = tmp_path / "arc.jsonl"
    arc.write_text('{"question": {"stem": "q"}, "answerKey": "A"}\n')
    with pytest.raises(DataError, match=r"record 1: arc_easy expects question\{stem, choices"):
        load_requests(TASKS["arc_easy"], arc)
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text('{"question": "q", "answer": "7"}\n')
    with pytest.raises(DataError, match="#### N"):
        load_requests(TASKS["gsm8k"], gsm, shots=0)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": \n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_requests(TASKS["piqa"], broken)
    pq = tmp_path / "x.parquet"
    pq.write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="needs pyarrow"):
            load_requests(TASKS["piqa"], pq)


# -- scoring -----------------------------------------------------------------------------------------------
def test_encode_pair_moves_trailing_space_into_the_continuation():
    tok = ByteTokenizer()
    assert encode_pair(tok, "Answer: ", "B") == ([256, *b"Answer:"], list(b" B"))


@pytest.mark.parametrize("task", ["mmlu", "hellaswag", "winogrande", "piqa", "arc_easy", "arc_challenge"])
def test_choice_scores_equal_a_direct_forward(tmp_path, task):
    lm, t = FakeLM(), TASKS[task]
    reqs = load_requests(t, DATA / f"{task}.jsonl", fewshot=DATA / "mmlu_dev.jsonl" if task == "mmlu" else None)
    results = evaluate_task(lm, t, reqs, ResultCache(tmp_path / "c.jsonl"), Settings(max_batch_tokens=300),
                            shots=t.shots, samples=1, chunk=2, progress=False)
    for req, res in zip(reqs, results):
        ref = [direct_logprob(lm.model, [256, *c.encode()], list(x.encode())) for c, x in req.options]
        assert res["logprobs"] == pytest.approx(ref, abs=1e-4)
        by_norm = [lp / len(x) for lp, (_, x) in zip(ref, req.options)]
        assert res["acc"] == float(max(range(len(ref)), key=ref.__getitem__) == req.label)
        assert res["acc_norm"] == float(max(range(len(ref)), key=by_norm.__getitem__) == req.label)


def test_perplexity_equals_direct_forward():
    lm = FakeLM()
    text = (DATA / "sample.txt").read_text()
    ids = [256, *text.encode()]
    nll = -direct_logprob(lm.model, ids[:1], ids[1:])
    got = perplexity(lm, text)
    assert got["tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-4)


# -- generation, voting, the run as a whole ----------------------------------------------------------------
def _question(prompt: str) -> str:
    return prompt.rsplit("Question: ", 1)[1].split("\n")[0]


def gsm8k_answer(prompt: str, seed: int) -> str:
    """Seeds 0-2 say 7 (wrong for the first question only), seeds 3-7 give the gold answer."""
    gold = {"Tom": "7", "A book": "36", "Sara": "2,000"}[_question(prompt).split(" has")[0].split(" costs")[0]
                                                         .split(" saves")[0]]
    return f"Let me think.\n#### {gold if seed >= 3 else 8 if gold == '7' else 7}"


def test_gsm8k_majority_of_eight(tmp_path):
    lm = FakeLM(gsm8k_answer)
    report = run_eval(lm, ["gsm8k"], {"gsm8k": DATA / "gsm8k.jsonl"}, output=tmp_path, progress=False)
    assert len(lm.prompts) == 8  # one generate call per sample, all three prompts in each
    items = [json.loads(x)["result"] for x in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert [r["pred"] for r in items] == ["7", "36", "2000"]
    assert report["tasks"]["gsm8k"]["score"] == pytest.approx(100.0)
    # with 4 samples the 3 wrong votes (seeds 0-2) beat the 1 right one everywhere
    small = run_eval(lm, ["gsm8k"], {"gsm8k": DATA / "gsm8k.jsonl"}, output=tmp_path / "k4",
                     samples={"gsm8k": 4}, progress=False)
    assert small["tasks"]["gsm8k"]["score"] == 0.0 and small["tasks"]["gsm8k"]["samples"] == 4


def test_exact_match_tasks_and_report(tmp_path, capsys):
    answers = {"Fe?": " iron\n", "ocean?": " The Pacific", "Lisa?": " Michelangelo", "species": " Darwin.",
               "france": " paris", "spider": " six"}
    lm = FakeLM(lambda p, s: next(v for k, v in answers.items() if k in p.rsplit("Q: ", 1)[1]))
    data = {"triviaqa": DATA / "triviaqa.jsonl", "naturalquestions": DATA / "naturalquestions.jsonl"}
    report = run_eval(lm, list(data), data, output=tmp_path, settings=Settings(model="tiny"), progress=False)
    assert report["tasks"]["triviaqa"]["score"] == pytest.approx(200 / 3)
    assert report["tasks"]["naturalquestions"]["score"] == pytest.approx(200 / 3)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["tasks"]["triviaqa"]["n"] == 3 and saved["tasks"]["triviaqa"]["shots"] == 5
    md = (tmp_path / "results.md").read_text()
    assert "| triviaqa | em | 66.7 | 3 | 5 | 1 | 63.8 | 69.6 | 34.9 | 69.9 |" in md
    assert list(PAPER) == ["Llama 2 7B", "Llama 2 13B", "Code-Llama 7B", "Mistral 7B"]
    assert (tmp_path / "results.png").exists() or "matplotlib is not installed" in capsys.readouterr().err


def test_interrupted_run_resumes_with_only_the_missing_items(tmp_path):
    data = {"naturalquestions": DATA / "naturalquestions.jsonl"}
    lm = FakeLM(lambda p, s: " Paris", fail_after=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_eval(lm, list(data), data, output=tmp_path, chunk=1, progress=False)
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 2
    resumed = FakeLM(lambda p, s: " Paris")
    report = run_eval(resumed, list(data), data, output=tmp_path, chunk=1, progress=False)
    assert [p[0].rsplit("Q: ", 1)[1] for p in resumed.prompts] == ["how many legs does a spider have\nA:"]
    assert report["tasks"]["naturalquestions"]["score"] == pytest.approx(100 / 3)
    # a changed setting is a different key: nothing is reused
    again = FakeLM(lambda p, s: " Paris")
    run_eval(again, list(data), data, output=tmp_path, shots={"naturalquestions": 1}, progress=False)
    assert len(again.prompts[0]) == 3


def test_missing_data_and_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="--data piqa=PATH"):
        run_eval(FakeLM(), ["piqa"], {}, output=tmp_path)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        run_eval(FakeLM(), ["nope"], {}, output=tmp_path)


def test_parquet_layout(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    rows = [json.loads(x) for x in (DATA / "piqa.jsonl").read_text().splitlines()]
    pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "piqa.parquet")
    assert load_requests(TASKS["piqa"], tmp_path / "piqa.parquet") == load_requests(TASKS["piqa"], DATA / "piqa.jsonl")


def test_cli(tmp_path, monkeypatch, capsys):
    import gale.cli

    monkeypatch.setattr(gale.cli, "_load", lambda a: FakeLM(lambda p, s: " Paris"))
    argv = ["eval", "piqa", "naturalquestions", "--data", f"piqa={DATA / 'piqa.jsonl'}", "--data",
            f"naturalquestions={DATA / 'naturalquestions.jsonl'}", "--limit", "2", "--shots", "naturalquestions=1",
            "--output", str(tmp_path)]
    assert gale.cli.main(argv) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["limit"] == 2 and saved["tasks"]["naturalquestions"]["score"] == 50.0
    assert saved["tasks"]["piqa"]["n"] == 2 and "| piqa | acc_norm |" in capsys.readouterr().out
    assert gale.cli.main(["eval", "perplexity", str(DATA / "sample.txt")]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == len((DATA / "sample.txt").read_bytes())
    assert gale.cli.main(["eval", "gsm8k", "--data", "gsm8k"]) == 2
    assert "--data expects TASK=VALUE" in capsys.readouterr().err


def test_math_majority_of_four(tmp_path):
    # every prompt gets 2 right (boxed, equal after normalisation) and 2 differing wrong samples
    def answer(prompt: str, seed: int) -> str:
        gold = {"frac": r"\dfrac{3}{4}", "2x": "x = 5", "sqrt": "4"}[next(k for k in ("frac", "2x", "sqrt")
                                                                           if k in prompt.rsplit("Problem:", 1)[1])]
        final = f"Final Answer: The final answer is ${gold}$."
        return [f"so $\\boxed{{{gold}}}$", "\\boxed{9}", final, "no idea"][seed]

    report = run_eval(FakeLM(answer), ["math"], {"math": DATA / "math.jsonl"}, output=tmp_path, progress=False)
    assert report["tasks"]["math"]["score"] == 100.0 and report["tasks"]["math"]["metric"] == "maj@4"
