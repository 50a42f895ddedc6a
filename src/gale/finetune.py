"""LoRA instruction fine-tuning: JSONL data -> masked, packed batches -> AdamW on the adapters only.

Data is one JSON object per line: `{"messages": [{"role", "content", "weight"?}, ...]}` (a chat; loss on the
assistant answers the model's chat format produces, end-of-turn included; `"weight": 0` excludes an answer)
or `{"text": ...}` (loss on every token). Every bad line is reported with its number and reason and the good
ones train: nothing is dropped or truncated silently.

Samples are packed up to `seq_len` tokens per forward; `gale.cache.plan` with one seqlen per sample gives the
block-diagonal, sliding-window mask, so a packed forward computes exactly what separate forwards would. The
loss is token-weighted over a whole optimizer step (all accumulated packs), which makes it independent of how
samples were packed or split into micro-batches.

A checkpoint holds the adapter, optimizer, scheduler, RNG states, step, epoch, this epoch's pack order and
the loss history, so a resumed run continues the same loss curve as one that never stopped.

Several processes (`torchrun --nproc_per_node N -m gale.cli finetune ...`, GPUs or machines) train data
parallel through torch.distributed: every process draws the same packs for a step (N x grad_accum of them)
and computes its share; gradients and losses are summed across processes before the optimizer step, so N
processes compute the update one process would with N x grad_accum. Process 0 logs and writes files.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cache import plan
from .lora import ALL_TARGETS, LoraConfig, apply_lora, lora_layers, lora_state_dict, save_adapter
from .model import Transformer

ROLES = ("system", "user", "assistant")
TRAINER_FILE = "trainer.pt"


# ---------------------------------------------------------------------------------------------------------- data


class Encoder(Protocol):
    """What fine-tuning needs from a tokenizer: chat -> (ids, mask on answer tokens), text -> ids."""

    def chat(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]: ...

    def text(self, text: str) -> list[int]: ...


class TokenizerEncoder:
    """The model's own chat format (gale.chat.encode_chat_with_mask); plain text ends with EOS so it stops."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def chat(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        from .chat import encode_chat_with_mask

        ids, mask = encode_chat_with_mask(self.tokenizer, messages)
        return list(ids), [bool(m) for m in mask]

    def text(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text))
        eos = getattr(self.tokenizer, "eos_id", None)
        return ids + [eos] if eos is not None else ids


@dataclass
class Sample:
    line: int
    ids: list[int]
    mask: list[bool]  # mask[i]: ids[i] is a target (predicted from ids[:i]); mask[0] is never used

    @property
    def n_inputs(self) -> int:
        return len(self.ids) - 1

    @property
    def n_targets(self) -> int:
        return sum(self.mask[1:])


class BadSample(ValueError):
    """A data line that cannot train; the message is the reason shown to the user."""


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    runs, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _message_weights(msgs: Any) -> list[int]:
    """Each message's loss weight (0 or 1), after checking its shape, role and content."""
    if not isinstance(msgs, list) or not msgs:
        raise BadSample("'messages' must be a non-empty list")
    weights = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadSample(f"message {i} is not an object")
        if m.get("role") not in ROLES:
            raise BadSample(f"message {i}: unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise BadSample(f"message {i}: empty content")
        if m.get("weight", 1) not in (0, 1) or isinstance(m.get("weight"), bool):
            raise BadSample(f"message {i}: weight must be 0 or 1, got {m['weight']!r}")
        weights.append(m.get("weight", 1))
    if msgs[-1]["role"] != "assistant":
        raise BadSample(f"last turn is {msgs[-1]['role']!r}, not 'assistant'")
    return weights


def _encode_messages(msgs: Any, encoder: Encoder) -> tuple[list[int], list[bool]]:
    """A conversation's ids and loss mask: the assistant turns of weight 1."""
    weights = _message_weights(msgs)
    answer_weights = [w for m, w in zip(msgs, weights) if m["role"] == "assistant"]
    if not any(answer_weights):
        raise BadSample("every assistant turn has weight 0: nothing to learn")
    try:  # the chat format has its own rules (e.g. Mistral's strict user/assistant alternation)
        ids, mask = encoder.chat([{"role": m["role"], "content": m["content"]} for m in msgs])
    except ValueError as e:
        raise BadSample(f"chat format: {e}") from e
    runs = _runs(mask)
    if len(runs) != len(answer_weights):
        raise BadSample(f"chat format gave {len(runs)} answer spans for {len(answer_weights)} assistant turns")
    for (a, b), w in zip(runs, answer_weights):
        mask[a:b] = [bool(w)] * (b - a)
    return ids, mask


def encode_record(obj: Any, encoder: Encoder, max_inputs: int) -> tuple[list[int], list[bool]]:
    """Validate one parsed line and tokenize it; raises BadSample with the reason."""
    if not isinstance(obj, dict):
        raise BadSample("not a JSON object")
    if "messages" in obj:
        ids, mask = _encode_messages(obj["messages"], encoder)
    elif "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise BadSample("empty text")
        ids = encoder.text(obj["text"])
        mask = [False] + [True] * (len(ids) - 1)
    else:
        raise BadSample("neither 'messages' nor 'text'")
    if len(ids) < 2 or not any(mask[1:]):
        raise BadSample("no token to learn")
    if len(ids) - 1 > max_inputs:
        raise BadSample(f"over-long: {len(ids)} tokens, the sequence length allows {max_inputs + 1}")
    return ids, mask


def read_jsonl(path: str | Path, encoder: Encoder, max_inputs: int) -> tuple[list[Sample], list[tuple[int, str]]]:
    """Good samples and (line number, reason) for every bad line; blank lines are not samples."""
    samples, problems = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                samples.append(Sample(n, *encode_record(json.loads(line), encoder, max_inputs)))
            except json.JSONDecodeError as e:
                problems.append((n, f"bad JSON: {e.msg} at column {e.colno}"))
            except BadSample as e:
                problems.append((n, str(e)))
    return samples, problems


def check_report(path: str | Path, encoder: Encoder, max_inputs: int) -> tuple[str, int]:
    """The `gale finetune --check` text and the number of bad lines."""
    samples, problems = read_jsonl(path, encoder, max_inputs)
    lines = [f"{path}:{n}: {reason}" for n, reason in problems]
    total, trained = sum(len(s.ids) for s in samples), sum(s.n_targets for s in samples)
    sizes = sorted(len(s.ids) for s in samples) or [0]
    lines.append(f"{path}: {len(samples)} good samples, {len(problems)} bad lines; {total:,} tokens ({trained:,} "
                 f"trained), per sample min {sizes[0]} / median {sizes[len(sizes) // 2]} / max {sizes[-1]}")
    return "\n".join(lines), len(problems)


def pack(samples: list[Sample], order: list[int], seq_len: int) -> list[list[int]]:
    """Group sample indices, in `order`, into packs of at most `seq_len` input tokens (each sample whole)."""
    packs: list[list[int]] = []
    used = seq_len + 1
    for i in order:
        if used + samples[i].n_inputs > seq_len:
            packs.append([])
            used = 0
        packs[-1].append(i)
        used += samples[i].n_inputs
    return packs


def packed_loss(model: Transformer, samples: list[Sample]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the target tokens of samples packed into one forward, and their count."""
    dev = model.device
    tokens = torch.tensor([t for s in samples for t in s.ids[:-1]], device=dev)
    targets = torch.tensor([t for s in samples for t in s.ids[1:]], device=dev)
    keep = torch.tensor([m for s in samples for m in s.mask[1:]], device=dev).nonzero()[:, 0]
    meta = plan([s.n_inputs for s in samples], [0] * len(samples), model.args.sliding_window, device=dev)
    h = model.hidden_states(tokens, meta, None)
    logits = model.logits(h[keep])  # only where a target is learned: the vocab projection dominates small models
    return F.cross_entropy(logits, targets[keep], reduction="sum"), len(keep)


def data_parallel() -> tuple[int, int]:
    """(rank, number of processes): under torchrun, joins its process group first (NCCL on GPUs, else gloo)."""
    import torch.distributed as dist

    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    if not dist.is_initialized():
        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if gpu else "gloo")
        # left to interpreter teardown, gloo's threads are sometimes destroyed while still joinable (SIGABRT,
        # "terminate called without an active exception": once in a CI run); taken down first at exit instead
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def _sum_across_processes(tensors: list[torch.Tensor]) -> None:
    """In place: each tensor becomes its sum over the processes (one all-reduce for all of them)."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


# -------------------------------------------------------------------------------------------------------- config


@dataclass
class FinetuneConfig:
    """Every knob of a run; YAML keys and `gale finetune --flags` have these names."""

    data: str = ""
    eval_data: str | None = None
    out: str = "finetune-out"
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"  # or "linear": decay after warm-up, to min_lr_ratio * lr
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    epochs: float = 1.0
    steps: int | None = None  # optimizer steps; overrides epochs
    seq_len: int = 1024  # input tokens per packed forward
    grad_accum: int = 1  # packs per optimizer step
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    eval_every: int = 50
    save_every: int = 100
    seed: int = 0
    resume: str | None = None  # a checkpoint folder to continue from
    progress: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be cosine or linear, got {self.schedule!r}")
        if min(self.seq_len, self.grad_accum, self.eval_every, self.save_every) < 1:
            raise ValueError("seq_len, grad_accum, eval_every and save_every must be >= 1")

    @classmethod
    def load(cls, yaml_path: str | Path | None = None, **overrides: Any) -> FinetuneConfig:
        """A YAML file's values, then `overrides` (None = not given) on top; unknown YAML keys are errors."""
        values: dict[str, Any] = {}
        if yaml_path:
            import yaml

            values = yaml.safe_load(Path(yaml_path).read_text()) or {}
            unknown = set(values) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"{yaml_path}: unknown keys {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=tuple(self.targets))


def lr_lambda(cfg: FinetuneConfig, total: int) -> Callable[[int], float]:
    """Linear warm-up to lr, then cosine or linear decay to min_lr_ratio * lr at `total` steps."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


# ------------------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Owns the adapters, optimizer, schedule and data order of one run; `run()` trains to `total_steps`."""

    def __init__(self, model: Transformer, encoder: Encoder, cfg: FinetuneConfig,
                 log: Callable[[str], None] = print) -> None:
        self.rank, self.world = data_parallel()
        self.model, self.cfg, self.log = model, cfg, log if self.rank == 0 else lambda _: None
        log = self.log
        self.samples, problems = read_jsonl(cfg.data, encoder, cfg.seq_len)
        for n, reason in problems:
            log(f"{cfg.data}:{n}: skipped: {reason}")
        if not self.samples:
            raise ValueError(f"{cfg.data}: no usable sample ({len(problems)} bad lines)")
        self.eval_samples: list[Sample] = []
        if cfg.eval_data:
            self.eval_samples, eval_problems = read_jsonl(cfg.eval_data, encoder, cfg.seq_len)
            for n, reason in eval_problems:
                log(f"{cfg.eval_data}:{n}: skipped: {reason}")
        if not lora_layers(model):
            torch.manual_seed(cfg.seed)
            apply_lora(model, cfg.lora)
        self.params = [p for p in model.parameters() if p.requires_grad]
        model.gradient_checkpointing = cfg.gradient_checkpointing
        self.autocast = model.device.type == "cuda"  # bf16 autocast on GPU; CPU trains in the model's fp32
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.epoch, self.cursor, self.step = 0, 0, 0
        self.packs = self._epoch_packs(0)
        self.total_steps = cfg.steps or max(1, math.ceil(len(self.packs) * cfg.epochs / (cfg.grad_accum * self.world)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps))
        self.history: list[dict[str, float]] = []
        torch.manual_seed(cfg.seed)  # dropout stream; checkpoints save and restore it
        if cfg.resume:
            self.load_checkpoint(cfg.resume)

    def _epoch_packs(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return pack(self.samples, torch.randperm(len(self.samples), generator=g).tolist(), self.cfg.seq_len)

    def _next_packs(self) -> list[list[Sample]]:
        """The step's packs, all processes' together (every process draws the same ones)."""
        out = []
        for _ in range(self.cfg.grad_accum * self.world):
            if self.cursor == len(self.packs):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.packs = self._epoch_packs(self.epoch)
            out.append([self.samples[i] for i in self.packs[self.cursor]])
            self.cursor += 1
        return out

    def _loss(self, samples: list[Sample]) -> tuple[torch.Tensor, int]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return packed_loss(self.model, samples)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum` packs per process; the loss is the mean over all their targets."""
        self.model.train()
        packs = self._next_packs()
        n_targets = sum(s.n_targets for p in packs for s in p)
        total = torch.zeros(1, device=self.model.device)
        for p in packs[self.rank :: self.world]:
            loss, _ = self._loss(p)
            (loss / n_targets).backward()
            total += loss.detach().float()
        if self.world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            _sum_across_processes([p.grad for p in self.params] + [total])
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        row = {"step": self.step, "loss": total.item() / n_targets, "lr": lr,
               "tokens": sum(s.n_inputs for p in packs for s in p)}
        self.history.append(row)
        return row

    @torch.no_grad()
    def evaluate(self, samples: list[Sample] | None = None) -> float:
        """Token-weighted mean loss over held-out samples (file order, packed, no dropout)."""
        samples = self.eval_samples if samples is None else samples
        self.model.eval()
        sums = torch.zeros(2, device=self.model.device)  # loss, targets
        for p in pack(samples, list(range(len(samples))), self.cfg.seq_len)[self.rank :: self.world]:
            loss, n = self._loss([samples[i] for i in p])
            sums += torch.stack([loss.float(), torch.tensor(float(n), device=sums.device)])
        if self.world > 1:
            _sum_across_processes([sums])
        return sums[0].item() / max(sums[1].item(), 1)

    def save_checkpoint(self, folder: str | Path) -> Path:
        folder = save_adapter(folder, self.model, self.cfg.lora, base_model=self.cfg.model,
                              args=self.model.args.to_dict(), step=self.step)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng,
                    "step": self.step, "epoch": self.epoch, "cursor": self.cursor, "packs": self.packs,
                    "total_steps": self.total_steps, "history": self.history, "config": asdict(self.cfg)},
                   folder / TRAINER_FILE)
        return folder

    def load_checkpoint(self, folder: str | Path) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        state = torch.load(folder / TRAINER_FILE, weights_only=False)
        params = lora_state_dict(self.model)
        with torch.no_grad():
            for name, t in load_file(str(folder / "adapter.safetensors")).items():
                params[name].copy_(t)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.epoch, self.cursor, self.packs = state["step"], state["epoch"], state["cursor"], state["packs"]
        self.total_steps, self.history = state["total_steps"], state["history"]
        self.log(f"resumed from {folder} at step {self.step}/{self.total_steps}")

    def run(self, until: int | None = None) -> list[dict[str, float]]:
        """Train to step `until` (default: the end), evaluating and checkpointing on schedule; returns the history."""
        cfg, out, main = self.cfg, Path(self.cfg.out), self.rank == 0  # process 0 alone writes
        until = min(until or self.total_steps, self.total_steps)
        out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="finetune", unit="step",
                   disable=not (cfg.progress and main))
        tokens, t0 = 0, time.perf_counter()
        while self.step < until:
            row = self.train_step()
            tokens += row["tokens"]
            if self.eval_samples and (self.step % cfg.eval_every == 0 or self.step == self.total_steps):
                row["eval_loss"] = self.evaluate()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}",
                            **({"eval": f"{row['eval_loss']:.3f}"} if "eval_loss" in row else {}))
            if not main:
                continue
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint(out / "checkpoints" / f"step-{self.step:06d}")
        bar.close()
        if self.step == self.total_steps and main:
            save_adapter(out / "adapter", self.model, cfg.lora, base_model=cfg.model, args=self.model.args.to_dict(),
                         step=self.step)
            plot_history(self.history, out / "loss.png")
        return self.history


def plot_history(history: list[dict[str, float]], path: Path) -> Path | None:
    """Training (and eval) loss against step, when matplotlib is installed (it is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train")
    ev = [r for r in history if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out")
    ax.set(xlabel="step", ylabel="loss (assistant tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------- CLI


def merge_to_checkpoint(adapter: str | Path, model: str | Path | None, out: str | Path, fmt: str) -> Path:
    """Base checkpoint + adapter -> a merged fp32 checkpoint (Mistral or HF layout) with the tokenizer files."""
    from .lora import load_adapter, read_adapter_config
    from .weights import load_model, open_checkpoint, save_hf, save_mistral

    if model is None:
        model = read_adapter_config(adapter)[1].get("base_model")
    if model is None:
        from .llm import default_model_path

        model = default_model_path()
    ckpt = open_checkpoint(model)
    base = load_model(ckpt, device="cpu", dtype=torch.float32)
    load_adapter(adapter, base, merge=True)
    folder = (save_mistral if fmt == "mistral" else save_hf)(out, base.state_dict(), base.args)
    if ckpt.path.is_dir():  # the tokenizer comes along; a GGUF keeps its vocabulary inside the file
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "tekken.json", "generation_config.json"):
            if (ckpt.path / name).is_file():
                shutil.copy(ckpt.path / name, folder / name)
    return folder


def cli(a: Any) -> None:
    """`gale finetune DATA`, `gale finetune --check DATA`, `gale finetune merge ADAPTER --out DIR`."""
    if a.data and a.data[0] == "merge":
        if len(a.data) != 2 or not a.out:
            raise ValueError("usage: gale finetune merge ADAPTER --out DIR [--model M] [--format mistral|hf]")
        print(merge_to_checkpoint(a.data[1], a.model, a.out, a.format))
        return
    overrides = {f.name: getattr(a, f.name, None) for f in fields(FinetuneConfig)}
    overrides["data"] = a.data[0] if a.data else None
    if a.data and len(a.data) > 1:
        raise ValueError(f"one data file, got {a.data}")
    cfg = FinetuneConfig.load(a.config, **overrides)
    if not cfg.data:
        raise ValueError("no data file: gale finetune DATA (or `data:` in --config)")
    from .llm import default_model_path, load

    if a.check:
        from .tokenizer import load_tokenizer
        from .weights import open_checkpoint

        path = Path(cfg.model) if cfg.model else default_model_path()
        ckpt = open_checkpoint(path)
        report, bad = check_report(cfg.data, TokenizerEncoder(load_tokenizer(path, gguf_metadata=ckpt.gguf_metadata)),
                                   cfg.seq_len)
        print(report)
        if bad:
            raise ValueError(f"{bad} bad lines in {cfg.data}")
        return
    rank, world = data_parallel()
    device = cfg.device
    if world > 1 and torch.cuda.is_available() and device in (None, "cuda"):
        device = f"cuda:{torch.cuda.current_device()}"  # torchrun's LOCAL_RANK, set by data_parallel()
    llm = load(cfg.model, device=device, dtype=cfg.dtype, progress=cfg.progress and rank == 0, quantized=False)
    if a.lora:  # continue training an existing adapter, with its own rank, alpha and targets
        from .lora import load_adapter

        lc = load_adapter(a.lora, llm.model, merge=False)
        cfg = replace(cfg, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, targets=list(lc.targets))
    trainer = Trainer(llm.model, TokenizerEncoder(llm.tokenizer), cfg)
    history = trainer.run()
    if rank:
        return
    last = history[-1] if history else {}
    print(f"adapter: {Path(cfg.out) / 'adapter'}  step {trainer.step}  loss {last.get('loss', float('nan')):.4f}"
          + (f"  held-out {last['eval_loss']:.4f}" if "eval_loss" in last else ""))
