"""Whether a float16 export's activations fit float16, where this CPU runs the check in fp32.

A CPU without native 16-bit matmuls verifies a float16 export with its weights read into fp32 (exact), so a
hidden state beyond float16's largest value (65504), which a GPU serving the float16 weights would turn into
an infinity and then NaN, stays finite there. Every module's output is watched during the check instead: the
largest magnitude seen, and in which module. In fp32 these are the values float16 would have to hold.
"""

from __future__ import annotations

import torch

from qlora_pipe.export.tensor_checks import FLOAT16_MAX


class ActivationRange:
    """Forward hooks on every module of a model, recording the largest finite output magnitude and where."""

    def __init__(self) -> None:
        self.largest = 0.0
        self.where = ""

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        for name, module in model.named_modules():
            if name:
                module.register_forward_hook(self._hook(name))
        return model

    def _hook(self, name: str):
        def record(_module, _inputs, output) -> None:
            tensors = output if isinstance(output, tuple | list) else (output,)
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
                    largest = tensor.detach().abs().max().item()
                    if largest > self.largest:
                        self.largest, self.where = largest, name

        return record

    def overflow(self) -> dict | None:
        """The largest activation and its module when float16 could not hold it, else None."""
        if self.largest <= FLOAT16_MAX:
            return None
        return {"module": self.where, "largest_activation": self.largest, "float16_max": FLOAT16_MAX}
