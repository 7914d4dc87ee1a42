"""Reaches into TRL. Verified with trl 1.16.0 (and 1.17.x allowed by pyproject).

keep_adapter_fp32_unless_bf16
    SFTTrainer.__init__ casts the trainable weights of every quantized model to bf16, whatever the
    precision. In an fp32 run on a CPU without native bf16 that makes every LoRA matmul an emulated
    bf16 one (about 30x slower); in an fp16 run the loss scaler needs fp32 master weights. So the
    adapter goes back to fp32 unless the run trains in bf16. The optimizer does not exist yet (it is
    created in train()), so nothing else holds the old tensors. Remove when TRL casts only for bf16.
    Caught by: tests/test_hardware.py::test_fp32_run_trains_like_bf16 (adapter dtypes on disk).
"""

from __future__ import annotations

import torch

VERIFIED = {"trl": "1.16.0"}


def keep_adapter_fp32_unless_bf16(model: torch.nn.Module, bf16: bool) -> None:
    if bf16:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.bfloat16:
            param.data = param.data.float()
