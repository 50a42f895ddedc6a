"""Gale: run, serve, evaluate and fine-tune Mistral-7B-class models."""

from typing import Any

from .config import ModelArgs

__version__ = "0.1.0"
__all__ = ["LLM", "ModelArgs", "__version__", "load"]


def __getattr__(name: str) -> Any:
    # `gale.load` / `gale.LLM` pull in torch, tokenizers and the engine only when first used.
    if name in ("load", "LLM"):
        from . import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'gale' has no attribute {name!r}")
