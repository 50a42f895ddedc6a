"""Gale: run, serve, evaluate and fine-tune Mistral-7B-class models."""

from .config import ModelArgs

__version__ = "0.1.0"
__all__ = ["ModelArgs", "__version__"]
