"""gale.gguf_lib: the gguf library without mistral_common's import-time cost, and mistral_common unharmed; its
constants without the library, interchangeable with the library's."""

import subprocess
import sys

PROBE = """
import sys
import gale.gguf_lib
gale.gguf_lib.gguf  # the whole library
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


def test_default_model_load_imports_no_gguf_package():
    extra = "load(progress=False, max_seqs=1); assert 'gguf' not in sys.modules, 'the whole gguf was imported'"
    code = f"import sys\nfrom gale import load\n{extra}\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_private_constants_work_with_the_library():
    import numpy as np

    from gale import gguf_lib

    ours, theirs = gguf_lib.GGMLQuantizationType, gguf_lib.gguf.GGMLQuantizationType
    for member in theirs:
        assert ours[member.name] == member and hash(ours[member.name]) == hash(member)
        assert gguf_lib.GGML_QUANT_SIZES.get(member) == gguf_lib.gguf.GGML_QUANT_SIZES.get(ours[member.name])
    block = np.random.default_rng(0).integers(0, 256, (1, 144), dtype=np.uint8)
    block[0, :4] = [0, 0x3C, 0, 0x3C]  # d = dmin = 1.0 in fp16: finite values
    np.testing.assert_array_equal(gguf_lib.gguf.quants.dequantize(block, ours.Q4_K),
                                  gguf_lib.gguf.quants.dequantize(block, theirs.Q4_K))
