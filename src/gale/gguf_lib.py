"""The `gguf` library (llama.cpp's file format, quantization tables and reference codecs), imported in two steps.

* `GGML_QUANT_SIZES` and `GGMLQuantizationType`, all that reading a GGUF needs when its types have kernels,
  come from `gguf/constants.py` alone (enums and tables; it imports nothing of gguf's), loaded as a private
  module. `gguf/__init__` imports every gguf module (the writer, the numpy codecs, yaml for metadata, the
  vocab converters): 50-100 ms of the default model's start that it never used. Its enum is a second class
  with gguf's members: IntEnum members compare and hash as their values, so gguf's tables and functions take
  either (tests/test_gguf_lib.py).
* `gguf`, this module's attribute, is the whole library, imported on first use (dequantizing a type without a
  kernel, writing a GGUF), without the `mistral_common` import its vocabulary module makes: `gguf.vocab`
  imports mistral_common's tokenizers at once (0.3-0.5 s: pydantic models, requests, PIL) for a `MistralVocab`
  converter Gale never calls. While `gguf` loads, those two modules are marked absent, so gguf takes its own
  "mistral_common is not installed" branch; the marks are removed right after, and mistral_common imports as
  usual later. A module already loaded is left alone, and so is a `gguf` imported before Gale.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_EAGER = ("mistral_common.tokens.tokenizers.mistral", "mistral_common.tokens.tokenizers.utils")


def _constants() -> ModuleType:
    """gguf's constants.py as the private module `gale._gguf_constants`, without gguf/__init__; gguf's own
    `gguf.constants` when gguf is already loaded."""
    if "gguf.constants" in sys.modules:
        return sys.modules["gguf.constants"]
    package = importlib.util.find_spec("gguf")
    if package is None or not package.submodule_search_locations:
        raise ImportError("the gguf package is not installed (pip install gguf)")
    location = Path(package.submodule_search_locations[0]) / "constants.py"
    spec = importlib.util.spec_from_file_location("gale._gguf_constants", location)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
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


def __getattr__(name: str) -> ModuleType:
    if name == "gguf":
        return _import_gguf()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_c = _constants()
GGML_QUANT_SIZES = _c.GGML_QUANT_SIZES
GGMLQuantizationType = _c.GGMLQuantizationType
