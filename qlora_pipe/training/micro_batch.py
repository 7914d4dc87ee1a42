"""`training.micro_batch_size: auto`: the largest micro batch that runs, found by OOM back-off.

Each candidate runs a real forward and backward pass on ``size`` sequences of ``max_length``
tokens (the worst case the data can produce); on out-of-memory the size halves. Gradient
accumulation is then set so the effective batch stays what the recipe asked for. The choice is
recorded in the run directory and reused on resume, so a resumed run sees the same batches.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import Recipe
from qlora_pipe.runs import RunDir, write_json_atomic

log = logging.getLogger(__name__)

AUTO_BATCH = "auto_batch.json"


@dataclass(frozen=True)
class BatchChoice:
    micro_batch_size: int
    gradient_accumulation_steps: int


def try_micro_batch(model, size: int, length: int) -> None:
    """One forward and backward pass at this size; raises torch.OutOfMemoryError when it does not fit."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (size, length), device=device)
    was_training = model.training
    model.train()
    try:
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def find_micro_batch(probe: Callable[[int], None], start: int, smallest: int = 1) -> int:
    """The first size from ``start`` down (halving) that fits; ``smallest`` is the least the method can
    train with (KTO: 2, its KL term comes from the other rows of the micro batch)."""
    size = start
    while size >= smallest:
        try:
            probe(size)
            return size
        except torch.OutOfMemoryError:
            log.warning("micro batch %d does not fit in memory; trying %d", size, size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size //= 2
    raise UserError(
        f"training.micro_batch_size: even a micro batch of {smallest} runs out of memory at data.max_length"
    )


def choose_batch(recipe: Recipe, run: RunDir, model, start: int | None = None) -> BatchChoice:
    """The concrete micro batch and accumulation for this run (probed once, then reused).
    ``start``: the first size to probe (the planner's largest fit; see plan.auto_sizes)."""
    t = recipe.training
    if t.micro_batch_size != "auto":
        return BatchChoice(t.micro_batch_size, t.gradient_accumulation_steps)
    recorded = run.root / AUTO_BATCH
    if recorded.is_file():
        choice = BatchChoice(**json.loads(recorded.read_text()))
        log.info("micro batch: %d (chosen when the run started)", choice.micro_batch_size)
        return choice
    length = recipe.data.max_length
    start = start or t.auto_micro_batch_start
    smallest = 2 if recipe.method == "kto" else 1
    size = find_micro_batch(lambda n: try_micro_batch(model, n, length), max(start, smallest), smallest)
    effective = t.effective_batch_size or t.gradient_accumulation_steps
    choice = BatchChoice(size, max(1, math.ceil(effective / size)))
    log.info(
        "micro batch: %d fits (x %d accumulation = %d sequences per step)",
        size,
        choice.gradient_accumulation_steps,
        size * choice.gradient_accumulation_steps,
    )
    write_json_atomic(
        recorded, {"micro_batch_size": size, "gradient_accumulation_steps": choice.gradient_accumulation_steps}
    )
    return choice
