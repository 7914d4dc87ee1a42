"""The long-context switches: when 'auto' turns them on, and the longest sequence each combination fits.

``training.tiled_mlp`` (models/tiled_mlp.py) and ``training.activation_offloading`` (TRL: checkpointed layer
inputs kept in pinned host memory) each lower the planned peak at a time cost (one more MLP forward per step;
host-to-GPU copies). At 'auto' a switch is on when, with the other 'auto' switches on, it lowers the planned peak
by at least ``PAYS`` of it or the plan does not fit the budget without it. Offloading needs a CUDA GPU: a CPU run
leaves it off. A sharded launch (FSDP) leaves both off at 'auto', and refuses tiled_mlp: true
(machine/shard_rules.py): neither has been run sharded. With ``data.max_length: auto`` the longest length is
planned with the 'auto' switches on and they are then settled at that length (where the plan does not fit
without them, so they stay on).
"""

from __future__ import annotations

from dataclasses import replace

from qlora_pipe.models.tiled_mlp import MLP_NAME
from qlora_pipe.plan.settings import PlanSettings
from qlora_pipe.plan.shapes import ModelShape
from qlora_pipe.plan.terms import plan_memory
from qlora_pipe.recipe import Recipe

PAYS = 0.10  # an 'auto' switch turns on when it lowers the planned peak by at least this fraction
SWITCHES = {"tiled_mlp": "training.tiled_mlp", "activation_offloading": "training.activation_offloading"}


def auto_switches(recipe: Recipe, gpu: bool) -> list[str]:
    """The long-context switches the recipe leaves at 'auto' (offloading only where a GPU runs it)."""
    t = recipe.training
    found = [name for name in SWITCHES if getattr(t, name) == "auto"]
    return [name for name in found if gpu or name != "activation_offloading"]


def tileable(shape: ModelShape) -> bool:
    """Whether the model's decoder layers have the ``layers.N.mlp`` modules models/tiled_mlp.py tiles."""
    return any(MLP_NAME.search(lin.name.rsplit(".", 1)[0]) for lin in shape.linears)


def unavailable_off(recipe: Recipe, s: PlanSettings, gpu: bool) -> PlanSettings:
    """``s`` with 'auto' offloading off where no GPU runs it (PlanSettings.from_recipe plans 'auto' as on)."""
    return s if gpu or recipe.training.activation_offloading != "auto" else replace(s, activation_offloading=False)


def settle_switches(shape: ModelShape, s: PlanSettings, auto: list[str], budget: int | None) -> PlanSettings:
    """``s`` with each 'auto' switch of ``auto`` on or off by the rule above (the others as ``s`` has them).
    Under a sharded launch (FSDP, ``s.gpus`` > 1) 'auto' leaves both off: neither is verified there yet."""
    if s.gpus > 1:
        return replace(s, **dict.fromkeys(auto, False))
    if "tiled_mlp" in auto and not tileable(shape):  # no decoder-layer MLP the tiled forward knows
        auto = [name for name in auto if name != "tiled_mlp"]
        s = replace(s, tiled_mlp=False)
    on = replace(s, **dict.fromkeys(auto, True))
    total = plan_memory(shape, on).total
    settled = {}
    for name in auto:
        without = plan_memory(shape, replace(on, **{name: False})).total
        settled[name] = without - total >= PAYS * without or (budget is not None and without > budget >= total)
    return replace(s, **settled)


def settled_recipe(recipe: Recipe, s: PlanSettings, gpu: bool) -> Recipe:
    """The recipe with its 'auto' long-context switches replaced by what was settled (off without a GPU)."""
    t = recipe.training
    update = {name: bool(getattr(s, name)) and (gpu or name != "activation_offloading") for name in SWITCHES}
    update = {name: value for name, value in update.items() if getattr(t, name) == "auto"}
    return recipe.model_copy(update={"training": t.model_copy(update=update)}) if update else recipe
