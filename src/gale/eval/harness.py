"""Gale as an lm-evaluation-harness model ("gale"), for its hundreds of tasks beyond the paper's twelve.

lm-eval is heavy and optional, so it is imported only when `harness_model()` is first called:

    from gale.eval.harness import harness_model
    GaleLM = harness_model()  # registers "gale"
    lm_eval.simple_evaluate(model=GaleLM(gale.load(path)), tasks=["hellaswag"])
    # or: simple_evaluate(model="gale", model_args="pretrained=PATH,device=cpu", ...)

Requests are read exactly as lm-eval's own `hf` model reads them (tests/test_eval_parity.py holds every
log-likelihood to it): the tokenizer's own BOS default (`add_bos_token` overrides it, as for `hf`), trailing
whitespace moved into the continuation, empty contexts as the prefix token, rolling log-likelihoods over
lm-eval's disjoint windows of `max_length` with the prefix token first, generated text decoded without its
prompt and cut at the stop sequences (which is what `hf` returns: a SentencePiece answer without its first
space).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from ..scoring import score_continuations
from .runner import LM, encode_pair, encode_text, prefix_token


@cache
def harness_model() -> type:
    """The lm_eval.api.model.LM subclass wrapping a loaded gale model, registered as "gale"."""
    import lm_eval.models  # noqa: F401 - lm-eval imports its own models only into an empty registry
    from lm_eval.api.model import LM as HarnessLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    @register_model("gale")
    class GaleLM(HarnessLM):
        def __init__(self, lm: LM | None = None, pretrained: str | None = None, device: str | None = None,
                     dtype: str | None = None, max_batch_tokens: int = 4096, add_bos_token: bool | None = None,
                     max_length: int | None = None, **_: Any) -> None:
            super().__init__()
            if lm is None:
                from ..llm import load

                lm = load(pretrained, device=device, dtype=dtype, progress=False)
            self.lm, self.max_batch_tokens = lm, int(max_batch_tokens)
            self.add_bos_token = _flag(add_bos_token)
            self.max_length = int(max_length or lm.model.args.max_seq_len)

        def _score(self, pairs: list[tuple[list[int], list[int]]], progress: bool) -> list[tuple[float, bool]]:
            scores = score_continuations(self.lm.model, pairs, max_batch_tokens=self.max_batch_tokens,
                                         progress=progress, max_len=self.max_length)
            return [(s.total, s.greedy) for s in scores]

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = [encode_pair(self.lm.tokenizer, *r.args, bos=self.add_bos_token) for r in requests]
            return self._score(pairs, not disable_tqdm)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            """lm-eval's windows: the text's ids (BOS per the tokenizer, as `hf` encodes them) in disjoint
            windows of max_length, the first read after the prefix token, each later one after the window's
            own preceding tokens."""
            tok = self.lm.tokenizer
            windows = [[make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=encode_text(tok, r.args[0], self.add_bos_token), prefix_token=prefix_token(tok),
                max_seq_len=self.max_length, context_len=1)] for r in requests]
            scores = iter(self._score([w for ws in windows for w in ws], not disable_tqdm))
            return [sum(next(scores)[0] for _ in ws) for ws in windows]

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            """One generate call per distinct set of generation arguments, all its prompts batched."""
            out: list[str] = [""] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
            for idx in groups.values():
                prompts = [requests[i].args[0] for i in idx]
                for i, text in zip(idx, self._generate(prompts, requests[idx[0]].args[1])):
                    out[i] = text
            return out

        def _generate(self, prompts: list[str], gen_kwargs: dict) -> list[str]:
            """As `hf`: contexts left-truncated to max_length - max_gen_toks, EOS's text among the stops."""
            tok = self.lm.tokenizer
            kw = normalize_gen_kwargs(dict(gen_kwargs), 256)
            until = handle_stop_sequences(kw.pop("until", None), eos=_piece(tok, tok.eos_id))
            max_gen = int(kw.pop("max_gen_toks"))
            if max_gen >= self.max_length:  # hf asserts the same
                raise ValueError(f"max_gen_toks {max_gen} leaves no room for a context in max_length {self.max_length}")
            sample = bool(kw.get("do_sample"))
            sampling = {"temperature": float(kw.get("temperature", 0.0)) if sample else 0.0}
            if sample and "top_p" in kw:
                sampling["top_p"] = float(kw["top_p"])
            ids = [encode_text(tok, p, self.add_bos_token)[-(self.max_length - max_gen):] for p in prompts]
            done = self.lm.generate_ids(ids, max_tokens=max_gen, seed=0, stop=until, **sampling)
            return [postprocess_generated_text(tok.decode(c.token_ids), until, None) for c in done]

    return GaleLM


def _flag(value: bool | str | None) -> bool | None:
    """A model_args boolean ("True"/"false" from the command line) or None."""
    return value if value is None or isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def _piece(tok: Any, token_id: int | None) -> str | None:
    return None if token_id is None else tok.id_to_piece(token_id)
