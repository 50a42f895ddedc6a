"""LoRA adapters: low-rank updates `W + (alpha / rank) * B @ A` on the model's frozen nn.Linear layers.

`LoraLinear` keeps the base layer's own `weight` parameter (same object, same state-dict name), so the base
checkpoint still loads into a wrapped model and `merge_lora` only has to add `scaling * B @ A` in place and
put a plain nn.Linear back. B starts at zero, so a freshly wrapped model computes exactly what the base did.
Adapters are saved as `adapter.safetensors` (the A/B tensors only) + `adapter_config.json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .quant import QuantLinear

ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "adapter_config.json"


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=ALL_TARGETS)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.targets) - set(ALL_TARGETS)
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {ALL_TARGETS}, got {self.targets}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if k == "targets" else v for k, v in d.items() if k in known})


class LoraLinear(nn.Linear):
    """y = x W^T + scaling * dropout(x) A^T B^T, with W shared with (not copied from) the wrapped layer.

    A and B stay fp32 whatever the base dtype: they are the optimizer's master weights (bf16 autocast on GPU
    still runs the matmuls in bf16).
    """

    def __init__(self, base: nn.Linear, config: LoraConfig) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        dev = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(config.rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, config.rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.dropout(x).to(self.lora_a.dtype), self.lora_a), self.lora_b)
        return out + (update * self.scaling).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """The dense weight update scaling * B @ A (fp32)."""
        return (self.lora_b @ self.lora_a) * self.scaling


def _targets(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, full name) of every nn.Linear whose attribute name is a target."""
    return [(parent, attr, f"{pname}.{attr}" if pname else attr)
            for pname, parent in model.named_modules() for attr, child in parent.named_children()
            if attr in targets and isinstance(child, nn.Linear)]


def weights_changed(model: nn.Module) -> None:
    """Say that `model`'s weights changed in place: an Engine over it clears its prefix cache before its next step
    (the stored keys/values were computed with the old weights). Whoever changes weights otherwise calls it too."""
    model.weights_version = getattr(model, "weights_version", 0) + 1


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze the model and wrap its target layers in place; returns the wrapped layer names."""
    model.requires_grad_(False)
    found = _targets(model, config.targets)
    if any(isinstance(getattr(p, a), LoraLinear) for p, a, _ in found):
        raise ValueError("the model already carries LoRA adapters: merge them first")
    if not found:
        quantized = any(isinstance(m, QuantLinear) for m in model.modules())
        raise ValueError(f"no nn.Linear named {config.targets} in the model" + (
            ": its layers are quantized blocks; load it with gale.load(..., quantized=False)" if quantized else ""))
    for parent, attr, _ in found:
        setattr(parent, attr, LoraLinear(getattr(parent, attr), config))
    weights_changed(model)
    return [name for _, _, name in found]


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only: `layers.0.attention.wq.lora_a`, ... (what an adapter file holds)."""
    return {f"{name}.{k}": getattr(m, k) for name, m in lora_layers(model).items() for k in ("lora_a", "lora_b")}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in the weight's dtype) and unwrap; the model is plain again."""
    for name, m in lora_layers(model).items():
        m.weight.add_(m.delta().to(m.weight.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, plain)
    weights_changed(model)
    return model


def save_adapter(folder: str | Path, model: nn.Module, config: LoraConfig, **info: Any) -> Path:
    """Write adapter.safetensors + adapter_config.json (`info`, e.g. the base model and args, goes in the JSON)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}, str(folder / ADAPTER_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({**info, "lora": config.to_dict()}, indent=2, default=str))
    return folder


def read_adapter_config(folder: str | Path) -> tuple[LoraConfig, dict[str, Any]]:
    path = Path(folder).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: not a LoRA adapter folder (no {CONFIG_FILE})")
    info = json.loads(path.read_text())
    return LoraConfig.from_dict(info["lora"]), info


def load_adapter(folder: str | Path, model: nn.Module, *, merge: bool = True) -> LoraConfig:
    """Wrap `model` with the adapter's config and fill A/B from disk; `merge` folds them in (fastest inference).

    Every tensor must match a wrapped layer by name and shape: an adapter trained for another model fails
    here, before any weight changes, instead of producing nonsense.
    """
    folder = Path(folder).expanduser()
    config, _ = read_adapter_config(folder)
    tensors = load_file(str(folder / ADAPTER_FILE))
    probe = _probe_shapes(model, config)
    got = {n: tuple(t.shape) for n, t in tensors.items()}
    if got != probe:
        diff = sorted(set(got) ^ set(probe)) or sorted(n for n in got if got[n] != probe[n])
        raise ValueError(f"{folder}: adapter does not fit this model (first mismatches: {diff[:4]})")
    apply_lora(model, config)
    params = lora_state_dict(model)
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    weights_changed(model)
    return merge_lora(model) if merge else config


def _probe_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """The adapter tensor shapes `config` would create on `model`, computed without touching it."""
    shapes = {}
    for parent, attr, name in _targets(model, config.targets):
        lin = getattr(parent, attr)
        shapes[f"{name}.lora_a"] = (config.rank, lin.in_features)
        shapes[f"{name}.lora_b"] = (lin.out_features, config.rank)
    return shapes
