"""`data.max_length: auto` and the first size `training.micro_batch_size: auto` tries, from the planner.

The budget is ``training.memory_budget`` when set, else the GPU's total memory. Without either
(a CPU run) there is nothing to plan against: max_length falls back to 2048 tokens (or the
model's positions, if fewer) and the micro batch search starts at ``auto_micro_batch_start``.
Under an FSDP launch (accelerate sets ACCELERATE_USE_FSDP, WORLD_SIZE and FSDP_OFFLOAD_PARAMS) max_length
is planned on one GPU's share of the sharded run (plan/fsdp.py), as `qlora-pipe plan --gpus N` prints it;
micro_batch_size auto is refused there (its probe runs one process's step).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from qlora_pipe.errors import UserError
from qlora_pipe.machine.host_memory import host_available
from qlora_pipe.plan.advice import largest_micro_batch, parse_size, recipe_plan, recipe_shape
from qlora_pipe.plan.long_context import SWITCHES, auto_switches, settled_recipe
from qlora_pipe.plan.settings import PlanSettings
from qlora_pipe.plan.shapes import ModelShape
from qlora_pipe.plan.terms import GiB
from qlora_pipe.recipe import Recipe

log = logging.getLogger(__name__)

NO_BUDGET_LENGTH = 2048
HOST_SHARE = 0.5  # of the host memory available at start, what offloaded activations may pin


def memory_budget(recipe: Recipe) -> int | None:
    """Bytes the auto sizes may plan for: the recipe's budget, else the GPU's memory, else None."""
    if recipe.training.memory_budget:
        return parse_size(recipe.training.memory_budget, "training.memory_budget")
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1]
    return None


def fsdp_launch() -> tuple[int, bool]:
    """(processes sharding the model, CPU offload) under accelerate's FSDP launch; (1, False) otherwise."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return 1, False
    world = os.environ.get("WORLD_SIZE", "1")
    gpus = int(world) if world.isdigit() and int(world) > 0 else 1
    return gpus, gpus > 1 and os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"


@dataclass(frozen=True)
class AutoSizes:
    """A run's sizes, resolved once: the recipe with a concrete max_length, and where the micro batch
    back-off starts. The budget is read and the model's shapes are built at most once."""

    recipe: Recipe
    micro_batch_start: int
    budget: int | None


def resolve_auto_sizes(recipe: Recipe) -> AutoSizes:
    import torch

    budget = memory_budget(recipe)
    t = recipe.training
    planning = budget is not None and t.micro_batch_size == "auto"
    gpu = torch.cuda.is_available()
    shape = recipe_shape(recipe) if planning or recipe.data.max_length == "auto" else None
    recipe = resolve_max_length(recipe, budget, shape, gpu)
    if shape is None and auto_switches(recipe, gpu):
        shape = optional_shape(recipe)
    recipe = resolve_long_context(recipe, budget, shape, gpu)
    start = micro_batch_start(recipe, budget, shape) if t.micro_batch_size == "auto" else t.auto_micro_batch_start
    return AutoSizes(recipe, start, budget)


def resolve_max_length(
    recipe: Recipe, budget: int | None, shape: ModelShape | None = None, gpu: bool = False
) -> Recipe:
    """The recipe with data.max_length 'auto' replaced by a number (unchanged otherwise). On a GPU, activation
    offloading may pin at most HOST_SHARE of the host memory available now."""
    if recipe.data.max_length != "auto":
        return recipe
    gpus, offload = fsdp_launch()
    host = int(HOST_SHARE * host_available()[0]) if gpu else None
    plan = recipe_plan(recipe, budget, shape=shape, gpus=gpus, cpu_offload=offload, gpu=gpu, host_budget=host)
    if budget is None:
        length = min(NO_BUDGET_LENGTH, plan.shape.max_positions or NO_BUDGET_LENGTH)
        log.info("data.max_length auto: %d tokens (no GPU and no training.memory_budget to plan against)", length)
    else:
        length = plan.settings.max_length
        log.info(
            "data.max_length auto: %d tokens, the longest the planner fits in %.1f GiB at micro batch %d%s",
            length,
            budget / GiB,
            plan.settings.micro_batch_size,
            f" (per GPU, FSDP over {gpus})" if gpus > 1 else "",
        )
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"max_length": length})})


def optional_shape(recipe: Recipe) -> ModelShape | None:
    """The model's shapes where only the 'auto' switches need them: None, logged, where the planner cannot read
    them (an architecture it does not know, a config the model stage will name as broken): the switches stay off
    and the model stage reports any real problem in its own words."""
    from qlora_pipe.methods import method_for

    if refusal := method_for(recipe).plan_refusal():
        log.info("long-context switches: not planned (%s); tiled MLP and offloading off", refusal.partition(": ")[2])
        return None
    try:
        return recipe_shape(recipe)
    except (UserError, AttributeError, KeyError, TypeError, ValueError, OSError) as exc:
        reason = " ".join(str(exc).split())[:200]
        log.info(
            "long-context switches: not planned (%s: %s); tiled MLP and offloading off", type(exc).__name__, reason
        )
        return None


def resolve_long_context(recipe: Recipe, budget: int | None, shape: ModelShape | None, gpu: bool) -> Recipe:
    """The recipe with training.tiled_mlp and activation_offloading 'auto' settled at its length
    (plan/long_context.py; offloading stays off without a GPU; both off where the shapes are unknown)."""
    if shape is None or not auto_switches(recipe, gpu):
        return settled_recipe(recipe, PlanSettings(1, 1), gpu)  # 'auto': off
    gpus, offload = fsdp_launch()
    plan = recipe_plan(recipe, budget, shape=shape, gpus=gpus, cpu_offload=offload, gpu=gpu)
    settled = settled_recipe(recipe, plan.settings, gpu)
    for name, key in SWITCHES.items():
        if getattr(recipe.training, name) == "auto":
            state = "on" if getattr(settled.training, name) else "off"
            log.info("%s auto: %s at %d tokens (plan/long_context.py)", key, state, recipe.data.max_length)
    return settled


def micro_batch_start(recipe: Recipe, budget: int | None, shape: ModelShape | None = None) -> int:
    """Where the OOM back-off of micro_batch_size auto starts: the planner's largest fit, if it can plan."""
    if budget is None or recipe.data.max_length == "auto":
        return recipe.training.auto_micro_batch_start
    plan = recipe_plan(recipe, budget, micro_batch_size=1, shape=shape)  # one process (refused when sharded)
    planned = largest_micro_batch(plan.shape, plan.settings, budget) or 1
    log.info("micro batch auto: the planner fits %d in %.1f GiB; probing from there", planned, budget / GiB)
    return planned
