"""The `gguf` library (llama.cpp's file format, quantization tables and reference codecs), imported without
the `mistral_common` import its vocabulary module makes.

`gguf/__init__` imports `gguf.vocab`, which imports mistral_common's tokenizers at once (0.3-0.5 s: pydantic
models, requests, PIL) for a `MistralVocab` converter Gale never calls; that was half of the default model's
load time. While `gguf` first loads, those two modules are marked absent, so gguf takes its own "mistral_common
is not installed" branch; the marks are removed right after, and mistral_common imports as usual later. A
module already loaded is left alone, and so is a `gguf` imported before Gale.
"""

from __future__ import annotations

import sys
from types import ModuleType

_EAGER = ("mistral_common.tokens.tokenizers.mistral", "mistral_common.tokens.tokenizers.utils")


def _import_gguf() -> ModuleType:
    absent = [name for name in _EAGER if name not in sys.modules] if "gguf" not in sys.modules else []
    for name in absent:
        sys.modules[name] = None  # `import name` now raises ImportError
    try:
        import gguf
    finally:
        for name in absent:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return gguf


gguf = _import_gguf()
GGML_QUANT_SIZES = gguf.GGML_QUANT_SIZES
GGMLQuantizationType = gguf.GGMLQuantizationType
