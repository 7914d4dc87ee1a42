"""Checks on tensors an export writes (finite, within float16's range) and handing freed memory back."""

from __future__ import annotations

import functools
import platform

import torch

from qlora_pipe.errors import UserError

CHECK_CHUNK = 1 << 22  # elements per piece of the finiteness check
FLOAT16_MAX = torch.finfo(torch.float16).max


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps large freed blocks otherwise, and the
    resident size would creep up to the model size over a long export)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    """glibc, found once: ctypes' find_library runs `ldconfig -p` in a child process at every call."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c") if platform.system() == "Linux" else None
    return ctypes.CDLL(name) if name else None


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """NaN/Inf anywhere refuses the export; checked in pieces (no full-size boolean mask)."""
    if tensor.is_floating_point():
        for piece in tensor.reshape(-1).split(CHECK_CHUNK):
            if not torch.isfinite(piece).all():
                raise UserError(f"export: merged tensor {name} has NaN or Inf values")


def check_fits_float16(name: str, tensor: torch.Tensor) -> None:
    """A merged weight beyond float16's range would be served as an infinity: refused, naming the tensor."""
    largest = tensor.abs().max().item()
    if largest > FLOAT16_MAX:
        raise UserError(
            f"export --dtype float16: {name} holds {largest:.4g}, beyond float16's largest value "
            f"{FLOAT16_MAX:.0f}; export bfloat16 or float32"
        )
