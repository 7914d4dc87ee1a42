"""GRPO's peak-memory terms (method: grpo), beside the SFT terms of plan/terms.py.

A GRPO step has two phases that never hold memory at the same time:

- generation: TRL samples the whole generation batch (micro_batch_size x gradient_accumulation_steps
  completions on each device) at once, with no gradients: its KV cache (every layer's keys and values
  for prompt + completion, in the compute dtype) and the last position's logits (fp32, plus the sampling
  probabilities) are the big terms;
- the training step: the policy forward and backward over micro_batch_size sequences of prompt +
  completion, scored through TRL's fused LM head (as SFT: plan/terms.py), with the frozen reference
  adapter's forward (grpo.beta > 0) run without gradients before it.

The planner prints the training step's terms as for SFT and the generation phase as the part of it that
goes beyond the training step's activations (0 when the step is the larger phase).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qlora_pipe.plan.shapes import ModelShape

if TYPE_CHECKING:
    from qlora_pipe.plan.settings import PlanSettings
    from qlora_pipe.recipe import Recipe

GENERATION_TERM = "generation beyond the step"
TRAINING_PHASE = ("activations kept", "transient peak")


def grpo_settings(recipe: Recipe) -> dict:
    """PlanSettings fields of a GRPO recipe (qlora_pipe/methods/grpo.py)."""
    return {"generation_steps": recipe.training.gradient_accumulation_steps, "reference_adapter": recipe.grpo.beta > 0}


def generation_batch(s: PlanSettings) -> int:
    return s.micro_batch_size * s.generation_steps


def kv_cache_bytes(shape: ModelShape, s: PlanSettings) -> int:
    """Keys and values of every layer for the generation batch at the full sequence (prompt + completion)."""
    per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * s.compute_bytes
    return generation_batch(s) * s.max_length * per_token


def sampling_logits_bytes(shape: ModelShape, s: PlanSettings) -> int:
    """The last position's logits for each completion being sampled, in fp32, and their probabilities."""
    return 2 * generation_batch(s) * shape.vocab_size * 4


def generation_terms(shape: ModelShape, s: PlanSettings, rows: list[tuple[str, int, str]]) -> list:
    if not s.generation_steps:
        return []
    kv, logits = kv_cache_bytes(shape, s), sampling_logits_bytes(shape, s)
    step = sum(b for name, b, _ in rows if name in TRAINING_PHASE)
    note = (
        f"{generation_batch(s)} completions x {s.max_length} tokens: KV cache {kv / 2**30:.2f} GiB + "
        f"sampling logits {logits / 2**30:.2f} GiB, beyond the step's activations {step / 2**30:.2f} GiB"
    )
    return [(GENERATION_TERM, max(0, kv + logits - step), note)]
