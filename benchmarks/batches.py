"""Proof that runs trained on the same batches: one sha256 per batch, the lists compared, not totals.

A worker installs ``BatchLog`` before its trainer is built. It wraps transformers' ``Trainer.training_step``,
which every TRL trainer reaches through ``super()`` (PipeTrainer and a plain SFTTrainer alike), so it sees each
batch as the optimizer step trains on it: after the data collator, ``get_batch_samples`` and
``_prepare_inputs``, on either side. It also counts the supervised tokens of those batches: label positions
after the first that are not -100 (the first is never a target of the shifted loss), as PipeTrainer counts
them for its summary.
"""

from __future__ import annotations

import hashlib
from typing import Any

KEYS = ("input_ids", "labels")


class BatchMismatch(RuntimeError):
    """Two runs that must train on the same batches did not."""


def batch_hash(inputs: dict[str, Any]) -> str:
    """sha256 over the token ids and labels of one batch, with their shapes (dtype normalised to int64)."""
    import torch

    h = hashlib.sha256()
    for key in KEYS:
        tensor = inputs[key].detach().to("cpu", torch.int64).contiguous()
        h.update(f"{key}{tuple(tensor.shape)}".encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def digest(hashes: list[str]) -> str:
    """One sha256 over a run's batch hashes, in order."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


class BatchLog:
    """Every batch this process trains on: its hash and its supervised tokens."""

    def __init__(self) -> None:
        self.hashes: list[str] = []
        self.supervised_tokens = 0

    def record(self, inputs: dict[str, Any]) -> None:
        self.hashes.append(batch_hash(inputs))
        self.supervised_tokens += int((inputs["labels"][..., 1:] != -100).sum())

    def install(self) -> BatchLog:
        from transformers import Trainer

        original = Trainer.training_step

        def training_step(trainer, model, inputs, *args, **kwargs):
            self.record(inputs)
            return original(trainer, model, inputs, *args, **kwargs)

        Trainer.training_step = training_step
        return self

    def result(self) -> dict[str, Any]:
        return {
            "supervised_tokens": self.supervised_tokens,
            "batches": len(self.hashes),
            "batch_digest": digest(self.hashes),
            "batch_hashes": self.hashes,
        }


def check_same_batches(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Every run's list of batch hashes must equal the first one's; raises BatchMismatch otherwise.

    Returns what the results file records (hashes, their digest and count), and drops each run's own
    list, which is then the same one.
    """
    named = [(f"{side} #{i + 1}", run) for side, side_runs in runs.items() for i, run in enumerate(side_runs)]
    if not named:
        raise BatchMismatch("no runs to compare")
    first_name, first = named[0]
    reference = first.get("batch_hashes")
    for name, run in named:
        hashes = run.get("batch_hashes")
        if not reference or hashes is None:
            raise BatchMismatch(f"{name}: no batch hashes recorded")
        if hashes != reference:
            pairs = zip(hashes, reference, strict=False)  # lists of different lengths differ at the shorter's end
            at = next((k for k, (a, b) in enumerate(pairs) if a != b), min(len(hashes), len(reference)))
            raise BatchMismatch(
                f"{name} trained on other batches than {first_name}: {len(hashes)} vs {len(reference)} batches, "
                f"first difference at batch {at + 1} ({digest(hashes)[:12]} vs {digest(reference)[:12]})"
            )
    for _, run in named:
        run.pop("batch_hashes")
    return {"batches": len(reference), "batch_digest": digest(reference), "batch_hashes": reference}
