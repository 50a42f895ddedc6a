"""The lm-evaluation-harness adapter, end to end on a local task (skipped when lm_eval is not installed)."""

from types import SimpleNamespace

import pytest
from test_eval import DATA, FakeLM, direct_logprob

from gale.eval.runner import run_eval

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def test_simple_evaluate_agrees_with_gale_eval(tmp_path):
    from lm_eval.tasks import TaskManager

    from gale.eval.harness import harness_model

    lm = FakeLM()
    piqa = {"task": "tiny_piqa", "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(DATA / "piqa.jsonl")}},
            "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "{{label}}",
            "doc_to_choice": "{{[sol1, sol2]}}", "output_type": "multiple_choice",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")]}
    out = lm_eval.simple_evaluate(model=harness_model()(lm), tasks=[piqa], bootstrap_iters=0,
                                  task_manager=TaskManager(include_defaults=False), verbosity="ERROR")
    ours = run_eval(lm, ["piqa"], {"piqa": DATA / "piqa.jsonl"}, output=tmp_path, progress=False)["tasks"]["piqa"]
    assert out["results"]["tiny_piqa"]["acc,none"] == ours["metrics"]["acc"]
    assert out["results"]["tiny_piqa"]["acc_norm,none"] == ours["metrics"]["acc_norm"]


def test_rolling_and_generation_requests():
    from gale.eval.harness import harness_model

    lm = FakeLM(lambda p, s: p.upper())
    model = harness_model()(lm)
    text = (DATA / "sample.txt").read_text()
    (rolling,) = model.loglikelihood_rolling([SimpleNamespace(args=(text,))], disable_tqdm=True)
    # as lm-eval's hf: the text as the tokenizer encodes it (BOS included), read after the prefix token (BOS)
    assert rolling == pytest.approx(direct_logprob(lm.model, [256], [256, *text.encode()]), rel=1e-4)
    lm.tokenizer.add_bos = False
    (rolling,) = model.loglikelihood_rolling([SimpleNamespace(args=(text,))], disable_tqdm=True)
    assert rolling == pytest.approx(direct_logprob(lm.model, [256], list(text.encode())), rel=1e-4)
    reqs = [SimpleNamespace(args=("a", {"until": ["\n"], "max_gen_toks": 5})),
            SimpleNamespace(args=("b", {"until": "x", "do_sample": True, "temperature": 0.5})),
            SimpleNamespace(args=("c", {"until": ["\n"], "max_gen_toks": 5}))]
    assert model.generate_until(reqs, disable_tqdm=True) == ["A", "B", "C"]
    assert lm.prompts == [["a", "c"], ["b"]]  # requests with the same arguments share one batch
