"""Reaches into bitsandbytes. Verified with bitsandbytes 0.50.2 (0.51.x allowed by pyproject).

keep_plain_nf4_on_cpu
    In eval mode without grad (evaluation, generation) bitsandbytes 0.50 repacks a CPU layer's weight
    in place for its AVX512-BF16 kernel, converting the absmax constants to bf16 and undoing double
    quantization. The inverse on save is lossy, so the base the adapter trains against would silently
    change after the first evaluation (the training loss of the same batch moved by ~1e-4). GPU runs
    never take this path. Turned off through the layer's ``support_avx512bf16_for_cpu`` attribute.
    Remove once bitsandbytes' CPU packing is lossless or opt-in.
    Caught by: tests/test_model.py::test_evaluation_does_not_alter_the_4bit_base.

quantized_like_loading, dequantized_fp32
    The export rebuilds dequant(quant(W)) for one tensor at a time with the same class and settings the
    training load used (``Params4bit`` moved to a device quantizes it), so the merge adds the LoRA delta
    to exactly the weights the adapter was trained against.
    Caught by: tests/test_export.py::test_merge_is_faithful_and_reloads_with_plain_transformers.
"""

from __future__ import annotations

import torch
from torch import nn

VERIFIED = {"bitsandbytes": "0.50.2"}


def keep_plain_nf4_on_cpu(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference fast path on the model's 4-bit layers (see above)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def quantized_like_loading(value: torch.Tensor, quant_type: str, double_quant: bool, quant_storage: torch.dtype):
    """The 4-bit parameter a CPU load with these settings makes of ``value`` (bitsandbytes' Params4bit)."""
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(
        value, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage
    ).to("cpu")


def dequantized_fp32(param) -> torch.Tensor:
    """dequant() of a quantized Params4bit, in its compute dtype as training saw it, then fp32."""
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(param.data, param.quant_state).float()
