"""Reaches into llama.cpp's converter. Verified with the converter vendored in llama-cpp-python 0.3.36
(``vendor/llama.cpp``: ``convert_hf_to_gguf.py``, its ``conversion`` package and ``gguf-py``).

``main`` runs in the converter's own process (``python -m qlora_pipe.export.converter_process CONVERTER_DIR
MODEL_DIR OUTFILE OUTTYPE``, or ``lora CONVERTER_DIR ADAPTER_DIR BASE_DIR OUTFILE OUTTYPE`` for
``convert_lora_to_gguf.py``): the converter puts its own ``gguf-py`` first on ``sys.path``, which must not shadow the
installed ``gguf`` package that qlora-pipe reads the result with.

known_pre_tokenizer
    The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a fixed text, and stops
    ("BPE pre-tokenizer was not recognized") for a tokenizer it has no hash for, such as one trained
    locally. When the tokenizer.json's pre-tokenizer is exactly GPT-2's byte-level split (ByteLevel with
    its regex, nothing else) or Qwen2's regex split (transformers' Qwen2 tokenizer, PRETOKENIZE_REGEX),
    llama.cpp's ``gpt-2`` or ``qwen2`` pre-tokenizer splits the same way, so that name is given instead
    of stopping; any other unknown tokenizer still stops, with the reason.
    Caught by: tests/test_gguf.py (the tiny models' tokenizers; token ids read back from the GGUF).

gpt2_context_length
    The converter's GPT-2 class reads ``n_ctx`` from config.json, which transformers 5 no longer writes;
    it is given n_positions (the same number). Caught by: tests/test_export.py (gpt2 to GGUF).

permute_rows, TRANSPOSED_WEIGHTS
    The converter stores the q and k projections of Llama-family models (LlamaModel.undo_permute) with
    each head's rotary halves interleaved; the GGUF check undoes nothing, it applies the same reordering
    to the merged weights before comparing; likewise it transposes GPT-2's Conv1D weights.
    Caught by: tests/test_export.py (exact f16 tensor equality, each architecture).

lora_alpha_for_llama_cpp
    llama.cpp scales a LoRA adapter by ``alpha / rank`` (the GGUF's ``adapter.lora.alpha`` over the rank of
    ``lora_b``); ``convert_lora_to_gguf.py`` copies ``lora_alpha`` and ignores ``use_rslora``,
    ``rank_pattern`` and ``alpha_pattern``. An rsLoRA adapter (scale alpha / sqrt(rank)) is converted with
    alpha x sqrt(rank), so llama.cpp applies the trained scale; per-module patterns are refused. The
    LoRA GGUF check multiplies the file's own alpha / rank by lora_b @ lora_a and compares with the trained
    delta. Caught by: tests/test_unmerged.py.

NORM_SHIFTED_ARCHITECTURES
    Gemma's RMSNorm multiplies by ``1 + weight``; the converter writes ``weight + 1`` (added in fp32
    after widening a bf16 tensor; norms are stored as F32), and the GGUF check adds the same before comparing.
    Caught by: tests/test_real_models.py (Gemma 3 270M to f16 GGUF, slow suite).
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
# Weights the converter transposes (conversion/gpt2.py: GPT-2's Conv1D layers are stored (in, out)).
TRANSPOSED_WEIGHTS = {"GPT2LMHeadModel": (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")}
# Architectures whose RMSNorm scales by (1 + weight): the converter stores weight + 1, computed in fp32
# (it widens bf16 tensors first) (conversion/gemma.py: GemmaModel, Gemma2Model, Gemma3Model.norm_shift).
NORM_SHIFTED_ARCHITECTURES = (
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
)


def lora_alpha_for_llama_cpp(config: dict) -> float:
    """The ``lora_alpha`` that makes llama.cpp's alpha / rank equal the adapter's trained scale."""
    import math

    alpha, rank = float(config["lora_alpha"]), int(config["r"])
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def permute_rows(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """The converter's q/k layout: rotary halves of each head interleaved (rows only)."""
    heads = n_head_kv  # q: called with (n_head, n_head); k: (n_head, n_kv_head)
    shape = weights.shape
    return weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def pre_tokenizer_name(model_dir: Path) -> str | None:
    """llama.cpp's name for this tokenizer.json's pre-tokenizer, when it is one llama.cpp splits the same way:
    GPT-2's byte-level split, or Qwen2's regex split (which transformers' Qwen2 tokenizer applies to any
    vocabulary it loads). None for anything else."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    if tokenizer.get("model", {}).get("type") != "BPE":
        return None
    pre = tokenizer.get("pre_tokenizer") or {}
    normalizer = (tokenizer.get("normalizer") or {}).get("type")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and normalizer is None:
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern", {}).get("Regex") == qwen2_regex()
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
        and normalizer in (None, "NFC")
    ):
        return "qwen2"
    return None


def qwen2_regex() -> str:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return PRETOKENIZE_REGEX


def gpt2_context_length() -> None:
    """GPT-2 configs written by transformers 5 have no n_ctx, which the converter reads: n_positions is it."""
    from conversion.base import ModelBase

    original = ModelBase.load_hparams  # a staticmethod (dir_model, is_mistral_format)

    def load_hparams(*args, **kwargs):
        hparams = original(*args, **kwargs)
        if hparams.get("model_type") == "gpt2" and "n_ctx" not in hparams and "n_positions" in hparams:
            hparams["n_ctx"] = hparams["n_positions"]
        return hparams

    ModelBase.load_hparams = staticmethod(load_hparams)


def known_pre_tokenizer(model_dir: Path) -> None:
    """Give the converter the gpt-2 pre-tokenizer for a GPT-2 byte-level tokenizer it has no hash for."""
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre
    name = pre_tokenizer_name(model_dir)

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if name:
                return name
            raise SystemExit(
                "gguf: llama.cpp does not know this tokenizer's pre-tokenizer (neither GPT-2's nor Qwen2's split); "
                "convert a model whose tokenizer llama.cpp lists, or add it with convert_hf_to_gguf_update.py"
            ) from None

    TextModel.get_vocab_base_pre = get_vocab_base_pre


MEMORY_LINE = "qlora-pipe converter host memory:"


def supported(architecture: str, mmproj: bool = False) -> bool:
    from conversion import get_model_class

    try:
        get_model_class(architecture, mmproj=mmproj)
    except NotImplementedError:
        return False
    return True


def converted_architecture(config: dict, mmproj: bool) -> str:
    """The architecture the converter converts, as it picks it (verified on llama.cpp 0.3.36's converter): a
    vision-language model's language model by its text_config's architecture; its projector (mmproj) by the
    model's own."""
    text = config.get("text_config") or {}
    if not mmproj and text.get("architectures"):
        return text["architectures"][0]
    return (config.get("architectures") or ["?"])[0]


def main(argv: list[str]) -> int:
    """``CONVERTER MODEL_DIR OUTFILE OUTTYPE`` (a model), ``mmproj CONVERTER MODEL_DIR OUTFILE OUTTYPE`` (a
    vision-language model's vision encoder and projector), or ``lora CONVERTER ADAPTER_DIR BASE_DIR OUTFILE
    OUTTYPE`` (a PEFT LoRA adapter, with the base folder it is served on giving the architecture)."""
    lora, mmproj = argv[0] == "lora", argv[0] == "mmproj"
    argv = argv[1:] if mmproj else argv
    if lora:
        converter, adapter_dir, model_dir, outfile, outtype = Path(argv[1]), argv[2], Path(argv[3]), argv[4], argv[5]
    else:
        converter, model_dir, outfile, outtype = Path(argv[0]), Path(argv[1]), argv[2], argv[3]
    sys.path[:0] = [str(converter), str(converter / "gguf-py")]
    architecture = converted_architecture(json.loads((model_dir / "config.json").read_text()), mmproj)
    if not supported(architecture, mmproj):
        what = "the vision projector (mmproj) of " if mmproj else ""
        print(f"gguf: llama.cpp's converter does not support {what}{architecture}", file=sys.stderr)
        return 2
    known_pre_tokenizer(model_dir)
    gpt2_context_length()
    if lora:
        script = converter / "convert_lora_to_gguf.py"
        sys.argv = [str(script), "--base", str(model_dir), "--outfile", outfile, "--outtype", outtype, adapter_dir]
    else:
        script = converter / "convert_hf_to_gguf.py"
        sys.argv = [str(script), str(model_dir), "--outfile", outfile, "--outtype", outtype]
        sys.argv += ["--mmproj"] if mmproj else []
    runpy.run_path(str(script), run_name="__main__")
    return 0
