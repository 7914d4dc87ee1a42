"""Reaches into llama.cpp's converter. Verified with the converter vendored in llama-cpp-python 0.3.36
(``vendor/llama.cpp``: ``convert_hf_to_gguf.py``, its ``conversion`` package and ``gguf-py``).

Run as ``python -m qlora_pipe.compat.llama_cpp CONVERTER_DIR MODEL_DIR OUTFILE OUTTYPE``, in its own
process: the converter puts its own ``gguf-py`` first on ``sys.path``, which must not shadow the
installed ``gguf`` package that qlora-pipe reads the result with.

known_pre_tokenizer
    The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a fixed text, and stops
    ("BPE pre-tokenizer was not recognized") for a tokenizer it has no hash for, such as one trained
    locally. When the tokenizer.json's pre-tokenizer is exactly GPT-2's byte-level split (ByteLevel with
    its regex, nothing else), llama.cpp's ``gpt-2`` pre-tokenizer splits the same way, so that name is
    given instead of stopping; any other unknown tokenizer still stops, with the reason.
    Caught by: tests/test_gguf.py (the tiny models' tokenizers; token ids read back from the GGUF).

permute_rows
    The converter stores the q and k projections of Llama-family models (LlamaModel.undo_permute) with
    each head's rotary halves interleaved; the GGUF check undoes nothing, it applies the same reordering
    to the merged weights before comparing. Caught by: tests/test_gguf.py (exact f16 tensor equality).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np

VERIFIED = {"llama-cpp-python": "0.3.36"}
# Architectures whose q/k rows the converter interleaves (conversion/llama.py: undo_permute = True).
PERMUTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


def permute_rows(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """The converter's q/k layout: rotary halves of each head interleaved (rows only)."""
    heads = n_head_kv  # q: called with (n_head, n_head); k: (n_head, n_kv_head)
    shape = weights.shape
    return weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def is_gpt2_byte_level(model_dir: Path) -> bool:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    pre = tokenizer.get("pre_tokenizer") or {}
    return (
        tokenizer.get("model", {}).get("type") == "BPE"
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True) is True
        and not tokenizer.get("normalizer")
    )


def known_pre_tokenizer(model_dir: Path) -> None:
    """Give the converter the gpt-2 pre-tokenizer for a GPT-2 byte-level tokenizer it has no hash for."""
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre
    gpt2 = is_gpt2_byte_level(model_dir)

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if gpt2:
                return "gpt-2"
            raise SystemExit(
                "gguf: llama.cpp does not know this tokenizer's pre-tokenizer (not GPT-2's byte-level split); "
                "convert a model whose tokenizer llama.cpp lists, or add it with convert_hf_to_gguf_update.py"
            ) from None

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def supported(architecture: str) -> bool:
    from conversion import get_model_class

    try:
        get_model_class(architecture)
    except NotImplementedError:
        return False
    return True


def main(argv: list[str]) -> int:
    converter, model_dir, outfile, outtype = Path(argv[0]), Path(argv[1]), argv[2], argv[3]
    sys.path[:0] = [str(converter), str(converter / "gguf-py")]
    architecture = (json.loads((model_dir / "config.json").read_text()).get("architectures") or ["?"])[0]
    if not supported(architecture):
        print(f"gguf: llama.cpp's converter does not support {architecture}", file=sys.stderr)
        return 2
    known_pre_tokenizer(model_dir)
    script = converter / "convert_hf_to_gguf.py"
    sys.argv = [str(script), str(model_dir), "--outfile", outfile, "--outtype", outtype]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
