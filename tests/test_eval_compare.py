"""`gale eval compare`: a task file through Gale's runner and lm-eval's hf model on the same tiny HF folder."""

import pytest
from test_eval import DATA
from test_eval_parity import bpe_folder, smol_tokenizer  # noqa: F401 - fixtures

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


def test_compare_refuses_generation_tasks(bpe_folder):  # noqa: F811
    import gale
    from gale.eval.compare import compare

    with pytest.raises(ValueError, match="multiple-choice"):
        compare(gale.load(bpe_folder, device="cpu", dtype="fp32", progress=False), None, "gsm8k",
                DATA / "gsm8k.jsonl")
