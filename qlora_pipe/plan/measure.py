"""Measured memory of a loaded model, to check the planner against.

``model.get_memory_footprint()`` counts parameters and buffers only, so it misses the
quantization constants bitsandbytes keeps beside each 4-bit weight (absmax, the nested
absmax and the code books). Here every tensor a 4-bit weight owns is counted once.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class WeightBytes:
    quantized: int = 0  # packed 4-bit data plus its quantization constants
    other: int = 0  # every other parameter: embeddings, lm_head, norms, biases, the adapter
    trainable: int = 0  # of which require grad (after k-bit preparation: the adapter only)

    @property
    def total(self) -> int:
        return self.quantized + self.other


def _quant_state_bytes(state) -> int:
    total = 0
    for name in ("absmax", "code", "offset"):
        tensor = getattr(state, name, None)
        if tensor is not None:
            total += tensor.numel() * tensor.element_size()
    nested = getattr(state, "state2", None)
    return total + (_quant_state_bytes(nested) if nested is not None else 0)


def measure_weight_bytes(model: nn.Module) -> WeightBytes:
    """Bytes of every parameter and buffer of ``model``, with 4-bit quantization constants included."""
    out, seen = WeightBytes(), set()
    tensors = [(p, True) for p in model.parameters()] + [(b, False) for b in model.buffers()]
    for tensor, is_param in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            out.quantized += size + _quant_state_bytes(state)
        elif is_param:
            out.other += size
            out.trainable += size if tensor.requires_grad else 0
    return out
