"""What a command's child process meets and prints: a CPU on which bitsandbytes looks for its Hub kernel at
import (AVX512-BF16, pretended through a sitecustomize), and the lines the libraries write on their own."""

from __future__ import annotations

from pathlib import Path

# Run before anything else in a child process (sitecustomize): the machine as a user has it.
AVX512_BF16_CPU = """
import importlib.abc, importlib.machinery, sys

class PretendAvx512Bf16(importlib.abc.MetaPathFinder):
    # bitsandbytes asks its native library whether the CPU has AVX512-BF16; answer yes, as on the CPUs
    # where it then fetches its Hub kernel at import (and, offline, logs that it could not).
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, PretendAvx512Bf16())
"""


def avx512_bf16_site(tmp_path: Path) -> Path:
    """A folder for a child's PYTHONPATH whose sitecustomize makes bitsandbytes see an AVX512-BF16 CPU."""
    site = tmp_path / "avx512-bf16"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(AVX512_BF16_CPU)
    return site


LIBRARY_BARS = ("Saving the dataset", "Truncating train dataset", "Dropping fully masked", "Loading weights", "Map")
GGUF_BAR = "Converting and de-quantizing GGUF tensors"  # transformers' own tqdm, blind to its switch
# What the libraries print on their own: bars, warnings, notices, INFO records about their internals.
LIBRARY_NOISE = (
    *LIBRARY_BARS,
    GGUF_BAR,
    "it/s]",
    "s/it]",
    "Warning:",
    "warnings.warn",
    "Skipping publisher trust check",  # kernels, offline, at bitsandbytes' import on an AVX512-BF16 CPU
    "Failed to load CPU gemm_4bit_forward",
    "generated new fontManager",  # matplotlib's INFO record on a fresh cache
)


def library_noise(text: str) -> list[str]:
    """The lines of a command's output that a library wrote on its own."""
    return [line[:200] for line in text.splitlines() if any(noise in line for noise in LIBRARY_NOISE)]
