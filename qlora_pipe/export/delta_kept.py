"""How much of the learned LoRA delta the served weights carry, per merged layer.

After a short QLoRA run the delta is about one 16-bit step of the weight; a merge that rounds an already
rounded base drops every element's delta under half a step. For each merged weight the share kept is the
projection of what the served weights changed on what the adapter learned:
``<served - base, delta> / <delta, delta>`` with ``delta = merged_fp32 - base`` (1.0: all of it, 0.0: none;
an unbiased rounding keeps ~1.0 on average). The export reports the mean and the worst layer, and refuses a
merge that keeps less than ``MIN_MEAN_KEPT`` on average (a dropped delta).
"""

from __future__ import annotations

from typing import Any

import torch

MIN_MEAN_KEPT = 0.9


def share_terms(base: torch.Tensor, merged: torch.Tensor, served: torch.Tensor) -> tuple[float, float]:
    """``<served - base, delta>`` and ``<delta, delta>`` of one weight, or of one block of its rows (a weight
    merged in row blocks adds its blocks' terms): fp32 ``base`` and ``merged``, ``served`` in the export dtype."""
    delta = merged.float() - base
    norm = float(delta.pow(2).sum())
    return float((served.float() - base).mul_(delta).sum()), norm


def share_kept(base: torch.Tensor, merged: torch.Tensor, served: torch.Tensor) -> float | None:
    """The projection above for one weight; None when the adapter did not change this weight at all."""
    dot, norm = share_terms(base, merged, served)
    return None if norm == 0.0 else dot / norm


class DeltaKept:
    """The per-layer shares of one export, summarized for export_info.json, fidelity.json and the card."""

    def __init__(self) -> None:
        self.shares: dict[str, float] = {}

    def add(self, name: str, base: torch.Tensor, merged: torch.Tensor, served: torch.Tensor) -> None:
        self.add_terms(name, *share_terms(base, merged, served))

    def add_terms(self, name: str, dot: float, norm: float) -> None:
        if norm != 0.0:
            self.shares[name] = dot / norm

    def summary(self) -> dict[str, Any] | None:
        if not self.shares:
            return None
        worst = min(self.shares, key=self.shares.__getitem__)
        mean = sum(self.shares.values()) / len(self.shares)
        return {"layers": len(self.shares), "mean": mean, "worst": self.shares[worst], "worst_layer": worst}


def kept_line(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "  delta kept: no LoRA delta merged"
    return (
        f"  delta kept {summary['mean']:.4f} mean over {summary['layers']} layers, worst {summary['worst']:.4f} "
        f"({summary['worst_layer']})"
    )
