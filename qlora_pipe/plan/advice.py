"""What fits: the largest micro batch, the longest sequence, and the switch that saves the most.

Memory grows monotonically with the micro batch and the sequence length, so both limits are
found by bisection over the planner's formulas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from qlora_pipe.plan.layer_bytes import offloaded_host_bytes
from qlora_pipe.plan.long_context import SWITCHES as LONG_SWITCHES
from qlora_pipe.plan.long_context import auto_switches, settle_switches, unavailable_off
from qlora_pipe.plan.shapes import ModelShape, read_config, shape_from_config
from qlora_pipe.plan.terms import MemoryPlan, PlanSettings, plan_memory
from qlora_pipe.recipe import Recipe
from qlora_pipe.sizes import parse_size

LENGTH_STEP = 64  # sequence lengths are planned in multiples of this
MAX_MICRO_BATCH = 1024


def largest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest n in [low, high] with fits(n), for monotone fits; None when not even low fits."""
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def largest_micro_batch(shape: ModelShape, s: PlanSettings, budget: int) -> int | None:
    return largest(lambda b: plan_memory(shape, replace(s, micro_batch_size=b)).total <= budget, 1, MAX_MICRO_BATCH)


def longest_sequence(
    shape: ModelShape, s: PlanSettings, budget: int, capped: bool = True, host_budget: int | None = None
) -> int | None:
    """The longest max_length (a multiple of 64, within the model's positions unless not ``capped``) that fits;
    with ``host_budget``, the activations offloading pins in host memory must fit it too."""
    top = ((shape.max_positions if capped else None) or 1 << 20) // LENGTH_STEP

    def fits(n: int) -> bool:
        settings = replace(s, max_length=n * LENGTH_STEP)
        if host_budget is not None and offloaded_host_bytes(shape, settings) > host_budget:
            return False
        return plan_memory(shape, settings).total <= budget

    steps = largest(fits, 1, top)
    return None if steps is None else steps * LENGTH_STEP


# Recipe changes that lower the peak, tried one at a time when a plan does not fit.
SWITCHES: list[tuple[str, Callable[[PlanSettings], PlanSettings]]] = [
    ("training.gradient_checkpointing=true", lambda s: replace(s, gradient_checkpointing=True)),
    ("training.activation_offloading=true", lambda s: replace(s, activation_offloading=True)),
    ("training.tiled_mlp=true", lambda s: replace(s, tiled_mlp=True)),
    ("training.optimizer=paged_adamw_8bit", lambda s: replace(s, optimizer="paged_adamw_8bit")),
    ("quantization.double_quant=true", lambda s: replace(s, double_quant=True)),
    ("quantization.enabled=true", lambda s: replace(s, quantized=True)),
    ("lora.dropout=0", lambda s: replace(s, lora_dropout=0.0)),
    ("training.micro_batch_size=1", lambda s: replace(s, micro_batch_size=1)),
    # GRPO: the generation batch is micro batch x accumulation completions, sampled at once (plan/grpo_terms.py)
    ("training.gradient_accumulation_steps=1", lambda s: replace(s, generation_steps=min(s.generation_steps, 1))),
]


@dataclass
class Advice:
    max_micro_batch: int | None  # at the plan's sequence length
    max_length: int | None  # at the plan's micro batch
    best_switch: str | None  # the one change that lowers the peak the most
    best_saving: int = 0
    switch_fits: bool = False


def advise(plan: MemoryPlan) -> Advice:
    if plan.budget is None:
        return Advice(None, None, None)
    shape, s, budget = plan.shape, plan.settings, plan.budget
    advice = Advice(largest_micro_batch(shape, s, budget), longest_sequence(shape, s, budget), None)
    if plan.fits:
        return advice
    for override, change in SWITCHES:
        saving = plan.total - plan_memory(shape, change(s)).total
        if saving > advice.best_saving:
            advice.best_switch, advice.best_saving = override, saving
            advice.switch_fits = plan.total - saving <= budget
    return advice


def fewest_gpus(plan: MemoryPlan, limit: int = 64) -> int | None:
    """The fewest GPUs (2 or more, FSDP) on which this plan's settings fit its budget per GPU."""
    if plan.budget is None:
        return None
    budget, shape = plan.budget, plan.shape
    # Memory falls as GPUs are added, so bisect over n = limit + 2 - gpus, which fits for small n.
    n = largest(lambda n: plan_memory(shape, replace(plan.settings, gpus=limit + 2 - n)).total <= budget, 2, limit)
    return None if n is None else limit + 2 - n


def recipe_shape(recipe: Recipe, config: dict | None = None) -> ModelShape:
    """The exact parameter shapes of the recipe's model, from its config.json (a meta-device build)."""
    return shape_from_config(config or read_config(recipe.model.name_or_path, recipe.model.revision))


def recipe_plan(
    recipe: Recipe,
    budget: int | None,
    config: dict | None = None,
    micro_batch_size: int | None = None,
    max_length: int | None = None,
    shape: ModelShape | None = None,
    gpus: int = 1,
    cpu_offload: bool = False,
    gpu: bool = True,
    host_budget: int | None = None,
) -> MemoryPlan:
    """The plan of a recipe; 'auto' sizes resolve to the largest that fit the budget (1 / 2048 without one).
    ``shape``: the model's shapes when the caller already has them (building them takes a meta-device model).
    ``gpus`` > 1: one GPU's share of an FSDP-QLoRA run (plan/fsdp.py), the budget per GPU. ``gpu``: the run
    has a CUDA GPU (activation offloading at 'auto' can be on); 'auto' switches are settled (plan/long_context.py).
    ``host_budget``: host memory the offloaded activations may pin (an 'auto' length stays within it)."""
    shape = shape or recipe_shape(recipe, config)
    t, d = recipe.training, recipe.data
    batch = micro_batch_size or (t.micro_batch_size if t.micro_batch_size != "auto" else None)
    length = max_length or (d.max_length if d.max_length != "auto" else None)
    s = replace(PlanSettings.from_recipe(recipe, batch or 1, length or 2048), gpus=gpus, cpu_offload=cpu_offload)
    s = unavailable_off(recipe, s, gpu)
    if budget is not None and length is None:
        s = replace(s, max_length=longest_sequence(shape, s, budget, host_budget=host_budget) or LENGTH_STEP)
    s = settle_switches(shape, s, auto_switches(recipe, gpu), budget)
    if batch is None and s.generation_steps:  # a method that samples completions in each step (GRPO)
        completions = t.effective_batch_size or t.gradient_accumulation_steps  # per step, sampled at once
        return plan_memory(shape, grpo_auto_batch(shape, s, budget, completions), budget)
    if budget is not None and batch is None:
        s = replace(s, micro_batch_size=largest_micro_batch(shape, s, budget) or 1)
    return plan_memory(shape, s, budget)


def grpo_auto_batch(shape: ModelShape, s: PlanSettings, budget: int | None, completions: int) -> PlanSettings:
    """GRPO with micro_batch_size auto, as training picks it: the largest micro batch that divides the completions
    per step (whole groups) and fits, the generation batch being all the step's completions (1 without a budget)."""
    smallest = replace(s, micro_batch_size=1, generation_steps=completions)
    if budget is None:
        return smallest
    for b in (b for b in range(completions, 0, -1) if completions % b == 0):
        candidate = replace(s, micro_batch_size=b, generation_steps=completions // b)
        if plan_memory(shape, candidate).total <= budget:
            return candidate
    return smallest


def plan_for_recipe(
    recipe: Recipe, config: dict | None = None, micro_batch_size: int | None = None, max_length: int | None = None
) -> MemoryPlan:
    """The plan at the recipe's sizes (or the given ones), against training.memory_budget if set."""
    budget = (
        parse_size(recipe.training.memory_budget, "training.memory_budget") if recipe.training.memory_budget else None
    )
    return recipe_plan(recipe, budget, config, micro_batch_size, max_length)


@dataclass(frozen=True)
class SwitchRow:
    tiled_mlp: bool
    activation_offloading: bool
    longest: int | None  # tokens at micro batch 1, within the budget

    @property
    def label(self) -> str:
        on = [LONG_SWITCHES[name].split(".")[1] for name in LONG_SWITCHES if getattr(self, name)]
        return " + ".join(on) or "neither"


def longest_by_switches(shape: ModelShape, s: PlanSettings, budget: int, capped: bool = True) -> list[SwitchRow]:
    """The longest sequence at micro batch 1 for each combination of the two switches (the rest as ``s``);
    not ``capped``: what memory allows, beyond the model's positions too."""
    rows = []
    for tiled, offload in ((False, False), (True, False), (False, True), (True, True)):
        settings = replace(s, micro_batch_size=1, tiled_mlp=tiled, activation_offloading=offload)
        rows.append(SwitchRow(tiled, offload, longest_sequence(shape, settings, budget, capped)))
    return rows
