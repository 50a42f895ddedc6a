"""Gale as an lm-evaluation-harness model ("gale"), for its hundreds of tasks beyond the paper's twelve.

lm-eval is heavy and optional, so it is imported only when `harness_model()` is first called:

    from gale.eval.harness import harness_model
    GaleLM = harness_model()  # registers "gale"
    lm_eval.simple_evaluate(model=GaleLM(gale.load(path)), tasks=["hellaswag"])
    # or: simple_evaluate(model="gale", model_args="pretrained=PATH,device=cpu", ...)
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from ..scoring import score_continuations, sequence_logprobs
from .runner import LM, encode_pair


@cache
def harness_model() -> type:
    """The lm_eval.api.model.LM subclass wrapping a loaded gale model, registered as "gale"."""
    import lm_eval.models  # noqa: F401 - lm-eval imports its own models only into an empty registry
    from lm_eval.api.model import LM as HarnessLM
    from lm_eval.api.registry import register_model

    @register_model("gale")
    class GaleLM(HarnessLM):
        def __init__(self, lm: LM | None = None, pretrained: str | None = None, device: str | None = None,
                     dtype: str | None = None, max_batch_tokens: int = 4096, **_: Any) -> None:
            super().__init__()
            if lm is None:
                from ..llm import load

                lm = load(pretrained, device=device, dtype=dtype, progress=False)
            self.lm, self.max_batch_tokens = lm, int(max_batch_tokens)

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = [encode_pair(self.lm.tokenizer, *r.args) for r in requests]
            scores = score_continuations(self.lm.model, pairs, max_batch_tokens=self.max_batch_tokens,
                                         progress=not disable_tqdm)
            return [(s.total, s.greedy) for s in scores]

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            tok = self.lm.tokenizer
            return [math.fsum(sequence_logprobs(self.lm.model, [tok.bos_id, *tok.encode(r.args[0], bos=False)]))
                    for r in requests]

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            """One generate call per distinct set of generation arguments, all its prompts batched."""
            out: list[str] = [""] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
            for idx in groups.values():
                kw = requests[idx[0]].args[1]
                until = kw.get("until", [])
                temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
                done = self.lm.generate([requests[i].args[0] for i in idx],
                                        max_tokens=int(kw.get("max_gen_toks", 256)), temperature=temperature,
                                        seed=0, stop=[until] if isinstance(until, str) else list(until))
                for i, c in zip(idx, done):
                    out[i] = c.text
            return out

    return GaleLM
