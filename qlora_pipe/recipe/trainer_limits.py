"""Settings TRL's trainers refuse only when they are built, refused here when the recipe is validated.

A refusal from inside a trainer's constructor comes after the run directory exists, the data is
prepared and the model is loaded, and ends in a ValueError traceback with the run marked failed. Each
rule below mirrors one such check of TRL 1.16 (the file and condition named beside it); when TRL drops
a check its rule can go. tests/test_preference_training.py::test_settings_trl_refuses_are_refused_by_validate
runs every recipe refused here through the real trainer, so a rule TRL no longer needs shows up there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qlora_pipe.recipe.lora_targets import is_target

Recipe = Any  # recipe/schema.py's Recipe, which calls these rules while it validates itself (no import back)

# kto_trainer.py: "Actual (not effective) batch size must be > 1" (qlora_pipe/methods/preference.py reads it too)
KTO_SMALLEST_MICRO_BATCH = 2


def _lm_head_adapter(recipe: Recipe) -> str | None:
    """dpo_trainer.py and kto_trainer.py score completions with lm_head's weight directly ("Applying a PEFT
    adapter to `lm_head` is not supported")."""
    targets = recipe.lora.target_modules
    if isinstance(targets, list) and is_target("lm_head", targets):
        return (
            f"lora.target_modules: method {recipe.method} computes log-probabilities from lm_head's weight "
            "directly, so a LoRA adapter on lm_head would never train; remove lm_head"
        )
    return None


def _kto_micro_batch(recipe: Recipe) -> str | None:
    """kto_trainer.py: "Actual (not effective) batch size must be > 1": the KL term is estimated from the other
    rows of the same micro batch."""
    size = recipe.training.micro_batch_size
    if size != "auto" and size < KTO_SMALLEST_MICRO_BATCH:
        return (
            "training.micro_batch_size: KTO estimates its KL term from the other rows of a micro batch; "
            f"use {KTO_SMALLEST_MICRO_BATCH} or more (or auto)"
        )
    return None


def _exo_pair(recipe: Recipe) -> str | None:
    """dpo_trainer.py: exo_pair needs label_smoothing > 0, which the recipe does not set (TRL's default is 0)."""
    if "exo_pair" in recipe.preference.loss_type:
        return "preference.loss_type: exo_pair needs label smoothing, which recipes do not set; choose another loss"
    return None


# Each method's rules, in the order they are checked.
RULES: dict[str, tuple[Callable[[Recipe], str | None], ...]] = {
    "dpo": (_lm_head_adapter, _exo_pair),
    "kto": (_lm_head_adapter, _kto_micro_batch),
}


def trainer_refusal(recipe: Recipe) -> str | None:
    """The one-line reason a trainer would refuse this recipe at construction, or None."""
    for rule in RULES.get(recipe.method, ()):
        if refusal := rule(recipe):
            return refusal
    return None
