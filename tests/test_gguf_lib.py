"""gale.gguf_lib: the gguf library without mistral_common's import-time cost, and mistral_common unharmed."""

import subprocess
import sys

PROBE = """
import sys
import gale.gguf_lib
loaded = sorted(m for m in sys.modules if m.startswith("mistral_common"))
from gale import load
{extra}
import mistral_common.tokens.tokenizers.mistral as m
print(loaded, sorted(m for m in sys.modules if m.startswith("mistral_common"))[:1], m.MistralTokenizer.__name__)
"""


def probe(extra: str = "") -> str:
    out = subprocess.run([sys.executable, "-c", PROBE.format(extra=extra)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_gguf_loads_without_mistral_common_which_still_imports_after():
    assert probe() == "[] ['mistral_common'] MistralTokenizer"


def test_default_model_load_imports_no_mistral_common():
    # the whole load of the default model (GGUF reader, tokenizer, kernels) stays off mistral_common
    extra = "load(progress=False, max_seqs=1); assert not [m for m in sys.modules if m.startswith('mistral_common')]"
    assert probe(extra).endswith("MistralTokenizer")
