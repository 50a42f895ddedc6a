"""`gale eval compare`: a task file through Gale's runner and lm-eval (its hf model, or driving Gale's) on the same
tiny HF folders: multiple choice, generation and code tasks."""

import pytest
from test_eval import DATA
from test_eval_parity import bpe_folder, sentencepiece_folder, smol_tokenizer  # noqa: F401 - fixtures

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def test_compare_prints_both_scores_and_the_largest_difference(bpe_folder, capsys):  # noqa: F811
    from gale.cli import main

    main(["eval", "compare", "piqa", "--data", f"piqa={DATA / 'piqa.jsonl'}", "--limit", "2", "--model",
          str(bpe_folder), "--device", "cpu", "--dtype", "fp32"])
    table = capsys.readouterr().out
    head, _, row = table.splitlines()
    assert "Gale" in head and "lm-eval hf" in head
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["piqa", "acc_norm", "2"] and cells[3] == cells[4]  # the same score
    assert float(cells[5].split()[0]) < 1e-3 and cells[6] == "100%"


def _row(argv, capsys) -> list[str]:
    from gale.cli import main

    main(["eval", "compare", *argv, "--device", "cpu", "--dtype", "fp32"])
    head, _, row = capsys.readouterr().out.splitlines()
    return [c.strip() for c in head.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]


@pytest.mark.parametrize("reference", ["hf", "gale"])
def test_compare_generation_tasks_texts_and_scores(bpe_folder, capsys, reference):  # noqa: F811
    """Greedy texts through lm-eval's generate_until (hf, or lm-eval driving Gale's model) equal Gale's runner's."""
    head, cells = _row(["naturalquestions", "--data", f"naturalquestions={DATA / 'naturalquestions.jsonl'}",
                        "--shots", "naturalquestions=0", "--limit", "3", "--model", str(bpe_folder),
                        "--reference", reference], capsys)
    assert head[4] == f"lm-eval {reference}" and head[5].startswith("texts that differ")
    assert cells[:3] == ["naturalquestions", "em", "3"] and cells[3] == cells[4]
    assert cells[5:] == ["0 (0)", "0", "-"]


def test_sentencepiece_texts_differ_only_by_hfs_dropped_first_space(sentencepiece_folder, capsys):  # noqa: F811
    """lm-eval's hf decodes an answer without its prompt, so a SentencePiece answer loses its first space; Gale's
    runner keeps it (README, Evaluation). That is the only difference, and it changes no exact-match score."""
    _, cells = _row(["triviaqa", "--data", f"triviaqa={DATA / 'triviaqa.jsonl'}", "--shots", "triviaqa=0",
                     "--limit", "3", "--model", str(sentencepiece_folder)], capsys)
    differ, only_space = cells[5].replace("(", "").replace(")", "").split()
    assert differ == only_space and cells[6] == "0" and cells[3] == cells[4]


def test_compare_code_tasks_runs_both_texts(bpe_folder):  # noqa: F811
    """A code task's texts from the reference are run as programs too: a reference answering with the canonical
    solution passes where the random model fails."""
    import gale
    from gale.eval.compare import compare
    from gale.eval.tasks import get_task, load_requests

    reqs = load_requests(get_task("humaneval"), DATA / "humaneval.jsonl", limit=2)

    class Canonical:
        def generate_until(self, instances, disable_tqdm=False):
            assert [i.args for i in instances] == [(r.prompt, {"until": list(get_task("humaneval").stop),
                                                              "max_gen_toks": 512, "do_sample": False}) for r in reqs]
            return [r.answer for r in reqs]

    lm = gale.load(bpe_folder, device="cpu", dtype="fp32", progress=False)
    row = compare(lm, Canonical(), "humaneval", DATA / "humaneval.jsonl", limit=2)
    assert row["metric"] == "pass@1" and row["lm_eval"] == 100.0 and row["gale"] == 0.0
    assert row["texts_differ"] == 2 and row["scores_differ"] == 2 and row["first_difference"]["item"] == 0
