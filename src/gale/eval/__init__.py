"""`gale.eval`: the Mistral 7B paper's benchmarks (Table 2) and perplexity, runnable on any loaded model.

    report = gale.eval.run_eval(gale.load(path), ["hellaswag", "gsm8k"],
                                {"hellaswag": "hellaswag_val.jsonl", "gsm8k": "gsm8k_test.jsonl"},
                                output="eval-out", limit=200)

Exports resolve lazily so that `gale --help` (which imports the `eval` command's module) stays fast.
"""

from typing import Any

__all__ = ["TASKS", "DataError", "Settings", "perplexity", "run_eval"]
_WHERE = {"TASKS": "tasks", "DataError": "data", "Settings": "runner", "perplexity": "runner", "run_eval": "runner"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        from importlib import import_module

        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'gale.eval' has no attribute {name!r}")
