"""The transformer against Hugging Face transformers' MistralForCausalLM on the same random weights.

Tiny windows (3-8) against 60-100 token sequences make every path wrap the rolling buffer many times.
"""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from gale.cache import RollingCache, plan
from gale.config import ModelArgs, to_hf_config
from gale.model import Transformer
from gale.weights.hf import from_hf

TOL = 1e-4


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=101,
                sliding_window=8, max_seq_len=512)
    return ModelArgs(**{**base, **kw})


def reference_pair(args: ModelArgs, seed: int = 0) -> tuple[MistralForCausalLM, Transformer]:
    """A random HF model and the Gale model holding the same weights (converted, not shared)."""
    torch.manual_seed(seed)
    cfg = MistralConfig(**to_hf_config(args), attn_implementation="eager")
    hf = MistralForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so differences cannot hide
        for p in hf.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    ours = Transformer(args).eval()
    state = {n: t for n, t in hf.state_dict().items() if not (args.tie_embeddings and n == "lm_head.weight")}
    ours.load_state_dict(dict(from_hf(n, t, args) for n, t in state.items()), strict=True)
    return hf, ours


def hf_logits(hf: MistralForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens[None]).logits[0]


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff < TOL, f"max abs diff {diff}"


@pytest.fixture(scope="module")
def pair():
    return reference_pair(tiny_args())


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 101, (70,), generator=torch.Generator().manual_seed(1))


def chunked(model: Transformer, tokens: torch.Tensor, chunk: int, slot: int = 0, cache=None) -> torch.Tensor:
    cache = cache or RollingCache(model.args, slot + 1, dtype=model.dtype)
    out = []
    with torch.no_grad():
        for i in range(0, len(tokens), chunk):
            piece = tokens[i : i + chunk]
            out.append(model(piece, cache.prepare([slot], [len(piece)]), cache))
    return torch.cat(out)


def test_one_shot_prefill_equals_reference(pair, tokens):
    hf, ours = pair
    with torch.no_grad():
        assert_close(ours(tokens), hf_logits(hf, tokens))


@pytest.mark.parametrize("chunk", [3, 8, 11, 70])  # below, at, above the window (non-dividing), whole prompt
def test_chunked_prefill_equals_reference(pair, tokens, chunk):
    hf, ours = pair
    assert_close(chunked(ours, tokens, chunk), hf_logits(hf, tokens))


def test_decode_through_many_wraps_equals_reference(pair, tokens):
    hf, ours = pair
    cache = RollingCache(ours.args, 1)
    with torch.no_grad():
        out = [ours(tokens[:5], cache.prepare([0], [5]), cache)]
        for t in range(5, len(tokens)):  # 65 single steps: the 8-slot buffer wraps 8 times
            meta = cache.prepare([0], [1])
            assert meta.decode
            out.append(ours(tokens[t : t + 1], meta, cache))
    assert_close(torch.cat(out), hf_logits(hf, tokens))
    assert cache.allocated == 8


def test_batch_of_different_lengths_equals_reference(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 101, (n,), generator=g) for n in (61, 23, 40, 9)]
    refs = [hf_logits(hf, s) for s in seqs]
    cache = RollingCache(ours.args, 6)
    slots = [5, 0, 3, 1]  # not contiguous: exercises the gathered-slot path
    done = [0] * 4
    out = [[] for _ in seqs]
    steps = [[13, 23, 7, 9], [11, 0, 33, 0], [37, 0, 0, 0]]  # mixed chunk sizes, then decode below
    with torch.no_grad():
        for sizes in steps:
            active = [i for i, n in enumerate(sizes) if n]
            toks = torch.cat([seqs[i][done[i] : done[i] + sizes[i]] for i in active])
            logits = ours(toks, cache.prepare([slots[i] for i in active], [sizes[i] for i in active]), cache)
            for i, part in zip(active, logits.split([sizes[i] for i in active])):
                out[i].append(part)
                done[i] += sizes[i]
    for i in range(len(seqs)):
        assert_close(torch.cat(out[i]), refs[i][: done[i]])
    # every sequence now decodes one token per step, together, to the end of the longest
    with torch.no_grad():
        while True:
            active = [i for i, s in enumerate(seqs) if done[i] < len(s)]
            if not active:
                break
            toks = torch.stack([seqs[i][done[i]] for i in active])
            logits = ours(toks, cache.prepare([slots[i] for i in active], [1] * len(active)), cache)
            for i, row in zip(active, logits):
                assert_close(row, refs[i][done[i]])
                done[i] += 1


def test_last_only_returns_each_sequences_last_logits(pair):
    _, ours = pair
    a, b = torch.arange(10), torch.arange(20, 27)
    meta = plan([10, 7], [0, 0], ours.args.sliding_window)
    with torch.no_grad():
        last = ours(torch.cat([a, b]), meta, last_only=True)
        assert_close(last[0], ours(a)[-1])
        assert_close(last[1], ours(b)[-1])


@pytest.mark.parametrize("window", [3, 5])
def test_window_edge_sees_exactly_w_keys_including_itself(window):
    """At one layer, position i depends on tokens i-W+1..i and not on i-W."""
    args = tiny_args(n_layers=1, sliding_window=window)
    hf, ours = reference_pair(args, seed=3)
    base = assert_sees_exactly_w_keys(ours, window)
    with torch.no_grad():
        assert_close(ours(base), hf_logits(hf, base))


def assert_sees_exactly_w_keys(model: Transformer, window: int) -> torch.Tensor:
    """Position 15 of a one-layer model's 20 random tokens changes with token 15-W+1 and not with token 15-W;
    returns the tokens."""
    base = torch.randint(0, 101, (20,), generator=torch.Generator().manual_seed(4))
    i = 15
    with torch.no_grad():
        ref = model(base)[i]
        outside, inside = base.clone(), base.clone()
        outside[i - window] = (base[i - window] + 1) % 101
        inside[i - window + 1] = (base[i - window + 1] + 1) % 101
        assert torch.equal(model(outside)[i], ref)
        assert (model(inside)[i] - ref).abs().max() > 1e-3
    return base


def test_stacked_layers_reach_past_the_window():
    """Two layers with W=3: position i feels token i-3 (outside one window) through layer stacking."""
    args = tiny_args(n_layers=2, sliding_window=3)
    _, ours = reference_pair(args, seed=5)
    base = torch.randint(0, 101, (20,), generator=torch.Generator().manual_seed(6))
    far = base.clone()
    far[15 - 3] = (base[15 - 3] + 1) % 101
    far_far = base.clone()
    far_far[15 - 5] = (base[15 - 5] + 1) % 101  # beyond 2 * (W - 1)
    with torch.no_grad():
        assert (ours(far)[15] - ours(base)[15]).abs().max() > 1e-4
        assert torch.equal(ours(far_far)[15], ours(base)[15])


def test_full_attention_model_equals_reference():
    args = tiny_args(sliding_window=None)
    hf, ours = reference_pair(args, seed=7)
    toks = torch.randint(0, 101, (50,), generator=torch.Generator().manual_seed(8))
    ref = hf_logits(hf, toks)
    assert_close(chunked(ours, toks, 7), ref)


def test_tied_embeddings_use_the_embedding_matrix():
    args = tiny_args(tie_embeddings=True)
    hf, ours = reference_pair(args, seed=9)
    assert ours.output is None
    toks = torch.randint(0, 101, (30,), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert_close(ours(toks), hf_logits(hf, toks))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.15), (torch.float16, 0.05)])
def test_half_precision_tracks_fp32(pair, tokens, dtype, tol):
    _, ours = pair
    half = Transformer(ours.args).to(dtype).eval()
    half.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ref = ours(tokens)
        got = chunked(half, tokens, 11)
    assert got.dtype == torch.float32  # logits always come back in fp32
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < tol, rel


def test_bad_token_shape_is_rejected(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="1-D"):
        ours(torch.zeros(2, 3, dtype=torch.long), plan([6], [0], 8))


def test_gradient_checkpointing_gives_the_same_gradients(pair, tokens):
    _, ours = pair
    model = Transformer(ours.args)
    model.load_state_dict(ours.state_dict())

    def grads(flag: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(tokens).logsumexp(-1).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        assert torch.allclose(a, b, atol=1e-5)
