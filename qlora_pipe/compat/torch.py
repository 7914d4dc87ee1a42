"""Reaches into PyTorch. Verified with torch 2.13.0 (2.6 to 2.14 allowed by pyproject).

all_finite
    The bad-step guard checks every gradient before each optimizer step. ``torch._foreach_norm`` (private,
    the fused kernel behind clip_grad_norm_) gives one norm per tensor in one call, and a non-finite value
    makes its norm non-finite, so the check costs one fused kernel and a single host sync instead of one
    sync per parameter. Fallback: the public per-tensor ``torch.linalg.vector_norm``.
    Caught by: tests/test_resume.py::test_a_non_finite_step_is_skipped_without_optimizer_or_scheduler_step.
"""

from __future__ import annotations

import torch

VERIFIED = {"torch": "2.13.0"}


def all_finite(tensors: list[torch.Tensor]) -> bool:
    if not tensors:
        return True
    foreach_norm = getattr(torch, "_foreach_norm", None)
    norms = foreach_norm(tensors) if foreach_norm else [torch.linalg.vector_norm(t) for t in tensors]
    return bool(torch.isfinite(torch.stack(list(norms))).all())
