"""LoRA adapters on a tiny random model: identity at init, frozen base, merge == unmerged, save/load."""

import pytest
import torch

from gale.config import ModelArgs
from gale.lora import (
    ALL_TARGETS,
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)
from gale.model import Transformer

ARGS = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=96,
                 sliding_window=8, max_seq_len=512)
TOKENS = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ARGS)


def train_a_little(model: Transformer, steps: int = 5) -> None:
    """A few AdamW steps on next-token loss, so B is far from zero."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(TOKENS[:-1]), TOKENS[1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_zero_b_leaves_logits_exactly_unchanged_and_base_frozen():
    model = tiny_model()
    with torch.no_grad():
        reference = model(TOKENS)
    names = apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    assert len(names) == ARGS.n_layers * len(ALL_TARGETS)
    with torch.no_grad():
        assert torch.equal(model(TOKENS), reference)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in names for k in ("lora_a", "lora_b")}
    assert all(m.scaling == 2.0 and not m.lora_b.any() for m in lora_layers(model).values())


def test_target_subset_and_validation():
    model = tiny_model()
    names = apply_lora(model, LoraConfig(rank=2, targets=("wq", "wv")))
    assert sorted(names) == sorted(f"layers.{i}.attention.{w}" for i in range(2) for w in ("wq", "wv"))
    assert not isinstance(model.layers[0].feed_forward.w1, LoraLinear)
    with pytest.raises(ValueError, match="already carries"):
        apply_lora(model, LoraConfig(rank=2, targets=("wq",)))
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets=("q_proj",))


def test_merged_equals_unmerged_after_training_and_adapter_round_trip(tmp_path):
    model = tiny_model()
    config = LoraConfig(rank=4, alpha=16, dropout=0.1)
    apply_lora(model, config)
    train_a_little(model)
    with torch.no_grad():
        unmerged = model(TOKENS)
    save_adapter(tmp_path / "adapter", model, config, note="test")

    reloaded = tiny_model()
    load_adapter(tmp_path / "adapter", reloaded, merge=False)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(TOKENS), unmerged)

    merge_lora(model)
    assert not lora_layers(model) and set(model.state_dict()) == set(tiny_model().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), unmerged, rtol=1e-5, atol=1e-5)
        fresh = tiny_model()
        load_adapter(tmp_path / "adapter", fresh, merge=True)
        torch.testing.assert_close(fresh(TOKENS), unmerged, rtol=1e-5, atol=1e-5)


def test_adapter_for_another_model_is_refused(tmp_path):
    model = tiny_model()
    apply_lora(model, LoraConfig(rank=4))
    save_adapter(tmp_path / "a", model, LoraConfig(rank=4))
    other = Transformer(ModelArgs(**{**ARGS.to_dict(), "dim": 32, "head_dim": 8}))
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(tmp_path / "a", other)
    assert not lora_layers(other)
