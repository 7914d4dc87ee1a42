"""The GPU check's long_context stage: the planner's longest sequence for each long-context switch, tried.

For each combination of training.tiled_mlp and training.activation_offloading (micro batch 1, r=16 on all
linear layers, under the check's 24 GB cap), the planner's longest sequence is trained for one step, and again
10% longer: the first should fit, the second shows whether the plan leaves room. Two trials per combination
instead of a search keep the stage within minutes at 8B scale (a step at 100k tokens takes tens of seconds).
What each trial found is on disk as soon as it is known (``progress``), so a stage cut short keeps it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.gpu_trials import default_recipe, fits

COMBOS: dict[str, dict[str, bool]] = {
    "neither": {"tiled_mlp": False, "activation_offloading": False},
    "tiled_mlp": {"tiled_mlp": True, "activation_offloading": False},
    "activation_offloading": {"tiled_mlp": False, "activation_offloading": True},
    "both": {"tiled_mlp": True, "activation_offloading": True},
}
DRY_LENGTH = 128  # a dry run tries this length (and 10% more) whatever the plan says
STEP = 64


def planned_longest(tmp: Path, config, budget: int, switches: dict[str, bool]) -> int | None:
    from qlora_pipe.plan.advice import longest_sequence, recipe_plan

    recipe = default_recipe(tmp, 2048, **switches)
    plan = recipe_plan(recipe, budget, config=config.to_dict(), micro_batch_size=1, max_length=2048)
    return longest_sequence(plan.shape, plan.settings, budget)


def long_context(model, tokenizer, tmp: Path, config, budget: int, dry: bool, progress: dict, save) -> dict:
    from qlora_pipe.errors import UserError
    from qlora_pipe.models.tiled_mlp import tile_mlps, untile_mlps
    from qlora_pipe.training.speed_switches import check_speed_switches

    out: dict[str, Any] = {"settings": "batch 1, r=16, all linear layers, no dropout; 24 GB cap", "budget": budget}
    for name, switches in COMBOS.items():
        if name in progress and "fits_10_percent_above" in progress[name]:
            out[name] = progress[name]
            continue
        try:
            check_speed_switches(default_recipe(tmp, 2048, **switches))
        except UserError as exc:
            out[name] = {"skipped": str(exc)}
            continue
        planned = planned_longest(tmp, config, budget, switches)
        row = progress.setdefault(name, {"planned_longest": planned})
        length = DRY_LENGTH if dry else planned
        if length is None:
            out[name] = row | {"skipped": "the planner fits no length"}
            continue
        above = (length * 11 // 10) // STEP * STEP
        trainer_switches = {"activation_offloading": switches["activation_offloading"]}
        if switches["tiled_mlp"]:
            tile_mlps(model)
        try:
            for key, tokens in (("fits_at_planned", length), ("fits_10_percent_above", above)):
                if key not in row:
                    row[key] = fits(model, tokenizer, tmp, tokens, config.vocab_size, **trainer_switches)
                    row[key.replace("fits", "tokens")] = tokens
                    save()
        finally:
            untile_mlps(model)
        out[name] = row
    return out
