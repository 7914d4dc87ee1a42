"""`training.micro_batch_size: auto`: the largest micro batch that runs, found by OOM back-off.

Each candidate runs a real forward and backward pass on ``size`` sequences of ``max_length``
tokens (the worst case the data can produce); on out-of-memory the size halves. Gradient
accumulation is then set so the effective batch stays what the recipe asked for. The choice is
recorded in the run directory and reused on resume, so a resumed run sees the same batches.

GRPO (sizes count completions) has a second phase: TRL samples the whole generation batch, micro batch x
accumulation = the completions per step (training.effective_batch_size, default gradient_accumulation_steps),
at once, whatever the micro batch. That phase is probed first, once, at its largest: the KV cache of every
completion at the full max_length and the sampling of a token in fp32. The training step is then probed as
GRPOTrainer runs it (the completion scored through TRL's fused LM head, the reference's forward first), and
the micro batch backs off over the sizes that divide the completions per step, so micro batch x
accumulation is exactly that many whole groups (a multiple of grpo.num_generations) and TRL accepts it.
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


def try_grpo_step(model, size: int, length: int, completion: int, reference: bool, temperature: float) -> None:
    """GRPO's training step at this size: ``size`` sequences of ``length`` tokens, the last ``completion`` of
    them scored through TRL's fused LM head (log-probs and entropy), forward and backward; with a reference
    (grpo.beta > 0) a forward without gradients first. Raises torch.OutOfMemoryError when it does not fit."""
    from qlora_pipe.compat.trl_grpo import fused_lm_head

    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (size, length), device=device)
    labels = ids.clone()
    labels[:, : max(0, length - completion)] = -100  # only the completion is scored
    was_training = model.training
    model.train()
    try:
        with fused_lm_head(model, temperature):
            if reference:
                with torch.no_grad():
                    model(input_ids=ids, labels=labels, fused_lm_head=True)
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
            (-out.log_probs.sum()).backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def try_generation(model, completions: int, length: int) -> int:
    """GRPO's generation phase at its largest: ``completions`` sequences of ``length`` tokens prefilled
    into the KV cache (generate's own prefill is the shorter prompt, its decoding steps one token each) and
    the next token sampled from fp32 probabilities. Returns the KV cache's bytes; raises
    torch.OutOfMemoryError when it does not fit."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (completions, length), device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            torch.multinomial(torch.softmax(out.logits[:, -1].float(), dim=-1), 1)
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values  # older name
            layers = cache.layers
            return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    finally:
        model.train(was_training)


def largest_divisor(total: int, size: int) -> int:
    """The largest micro batch up to ``size`` that divides ``total`` (0 for 0)."""
    return next((n for n in range(min(size, total), 0, -1) if total % n == 0), 0)


def find_micro_batch(
    probe: Callable[[int], None], start: int, smallest: int = 1, allowed: Callable[[int], int] = lambda n: n
) -> int:
    """The first size from ``start`` down (halving) that fits; ``smallest`` is the least the method can
    train with (KTO: 2, its KL term comes from the other rows of the micro batch). ``allowed`` rounds each
    candidate down to a size the method takes (GRPO: a divisor of the completions per step)."""
    size = allowed(start)
    while size >= smallest:
        try:
            probe(size)
            return size
        except torch.OutOfMemoryError:
            log.warning("micro batch %d does not fit in memory; trying %d", size, allowed(size // 2))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = allowed(size // 2)
    raise UserError(
        f"training.micro_batch_size: even a micro batch of {smallest} runs out of memory at data.max_length"
    )


def choose_batch(recipe: Recipe, run: RunDir, model, method, start: int | None = None) -> BatchChoice:
    """The concrete micro batch and accumulation for this run (probed once, then reused). ``method``: the
    run's (qlora_pipe/methods/), which says how to probe a size; ``start``: the first size to probe (the
    planner's largest fit; see plan.auto_sizes)."""
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
    smallest = method.smallest_micro_batch
    effective = t.effective_batch_size or t.gradient_accumulation_steps
    probe, allowed = method.batch_probe(recipe, model, effective, length) or (
        (lambda n: try_micro_batch(model, n, length)),
        (lambda n: n),
    )
    size = find_micro_batch(probe, max(start, smallest), smallest, allowed)
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


def probe_generation(model, completions: int, length: int) -> None:
    """GRPO: the generation batch (every completion of a step, sampled at once) must fit; no micro batch
    makes it smaller."""
    try:
        cache = try_generation(model, completions, length)
    except torch.OutOfMemoryError:
        raise UserError(
            f"training.micro_batch_size auto: generating a step's {completions} completions at once (TRL samples "
            f"micro batch x accumulation together) at data.max_length {length} runs out of memory; lower "
            "training.effective_batch_size (or gradient_accumulation_steps), data.max_length or max_completion_length"
        ) from None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log.info("generation batch: %d completions x %d tokens fit (KV cache %.1f MiB)", completions, length, cache / 2**20)
