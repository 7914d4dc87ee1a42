"""Speed and memory switches of the recipe: what each needs, checked before anything expensive runs.

Each switch is provided by a library (transformers, TRL, Liger, flash-attn); ``sft_config`` and
``load_base_model`` pass them on. This module only decides whether the combination can work on this
machine, so that a missing GPU or package is a one-line error at start, not a traceback after the
model has loaded. No torch import at module level: validation must stay instant.
"""

from __future__ import annotations

import importlib.util

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import Recipe

# recipe key -> (python module, pip package) that provides it
PACKAGES = {
    "training.liger_kernels": ("liger_kernel", "liger-kernel"),
    "model.attn_implementation: flash_attention_2": ("flash_attn", "flash-attn --no-build-isolation"),
}


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def requested_gpu_switches(recipe: Recipe) -> list[str]:
    """Recipe keys that are on and only work with a CUDA GPU (Triton kernels, CUDA streams)."""
    t = recipe.training
    keys = []
    if recipe.model.attn_implementation == "flash_attention_2":
        keys.append("model.attn_implementation: flash_attention_2")
    if t.liger_kernels:
        keys.append("training.liger_kernels")
    if t.activation_offloading is True:  # 'auto' stays off without a GPU
        keys.append("training.activation_offloading")
    return keys


def check_speed_switches(recipe: Recipe, gpu: bool | None = None) -> None:
    """Raise a one-line UserError naming the recipe key when a switch cannot work here."""
    gpu = has_gpu() if gpu is None else gpu
    t = recipe.training
    if t.padding_free and not recipe.data.packing and recipe.model.attn_implementation != "flash_attention_2":
        # TRL 1.16 documents padding-free as FlashAttention-only: other kernels would attend across the
        # concatenated rows or build a full (tokens x tokens) mask, which costs more memory than padding.
        raise UserError(
            "training.padding_free: needs model.attn_implementation: flash_attention_2 (GPU, pip install flash-attn), "
            "or data.packing: true (packed batches are already padding-free)"
        )
    for key in requested_gpu_switches(recipe):
        if not gpu:
            raise UserError(f"{key}: needs a CUDA GPU; set it to {_off_value(key)} to train on this machine")
    for key, (module, package) in PACKAGES.items():
        if key in requested_gpu_switches(recipe) and not _installed(module):
            raise UserError(f"{key}: the {module} package is not installed (pip install {package})")


def _off_value(key: str) -> str:
    return "sdpa" if key.startswith("model.attn_implementation") else "false"
