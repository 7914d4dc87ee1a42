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
    to exactly the weights the adapter was trained against. The dequant runs in fp32 by giving a copy of the
    quant state ``dtype = float32`` (bitsandbytes writes its output in that dtype; verified: the bf16
    dequant equals this fp32 one rounded to bf16, bit for bit).
    Caught by: tests/test_export.py::test_merge_is_faithful_and_reloads_with_plain_transformers and
    tests/test_merge_delta.py (a delta below one bf16 step is kept).
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
    """dequant() of a quantized Params4bit computed in fp32: the exact NF4 values (code x absmax). Training's
    dequant in the compute dtype is this value rounded once (bitsandbytes dequantizes into the quant state's
    dtype); adding the LoRA delta to that already-rounded weight and rounding again would drop every delta
    under half a 16-bit step, so the export adds it here and rounds once."""
    import copy

    import bitsandbytes as bnb

    state = copy.copy(param.quant_state)  # a shallow copy: the packed data and constants are shared, not copied
    state.dtype = torch.float32
    return bnb.functional.dequantize_4bit(param.data, state)
