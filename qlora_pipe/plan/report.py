"""`qlora-pipe plan`: the memory plan of a recipe as a table (or JSON), with advice."""

from __future__ import annotations

import json
from typing import Any

from qlora_pipe.hardware import PrecisionChoice, planning_hardware, resolve_recipe_precision
from qlora_pipe.plan.advice import Advice, advise, parse_size, recipe_plan
from qlora_pipe.plan.terms import GiB, MemoryPlan
from qlora_pipe.recipe import load_recipe

DEFAULT_BUDGET = "24GiB"


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def plan_table(plan: MemoryPlan, precision: PrecisionChoice | None = None) -> str:
    s = plan.settings
    width = max(len(name) for name, _ in plan.terms) + 2
    lines = [
        f"model: {plan.shape.model_type}, {plan.shape.total_params / 1e9:.2f}B params; "
        f"micro batch {s.micro_batch_size} x {s.max_length} tokens; trainable {plan.trainable_params:,}",
    ]
    if precision is not None:
        lines.append(f"precision: {precision.precision}, compute {precision.compute_dtype} ({precision.reason})")
    lines.append("")
    for name, size in plan.terms:
        lines.append(f"  {name:<{width}} {gib(size):>11}   {plan.notes.get(name, '')}")
    lines.append(f"  {'total (predicted peak)':<{width}} {gib(plan.total):>11}")
    if plan.budget is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"  {'budget':<{width}} {gib(plan.budget):>11}   {verdict}, headroom {gib(plan.headroom)}")
    return "\n".join(lines)


def advice_text(plan: MemoryPlan, advice: Advice) -> str:
    s = plan.settings
    lines = [
        f"largest micro batch at {s.max_length} tokens: {advice.max_micro_batch or 'none'}",
        f"longest sequence at micro batch {s.micro_batch_size}: {advice.max_length or 'none'} tokens",
    ]
    if advice.best_switch:
        outcome = "fits" if advice.switch_fits else "still does not fit"
        lines.append(f"biggest saving: --set {advice.best_switch} (-{gib(advice.best_saving)}, {outcome})")
    return "\n".join(lines)


def plan_json(plan: MemoryPlan, advice: Advice, precision: PrecisionChoice | None = None) -> dict[str, Any]:
    return {
        "precision": precision.as_dict() if precision else None,
        "model_type": plan.shape.model_type,
        "params": plan.shape.total_params,
        "trainable_params": plan.trainable_params,
        "micro_batch_size": plan.settings.micro_batch_size,
        "max_length": plan.settings.max_length,
        "terms": {name: size for name, size in plan.terms},
        "total": plan.total,
        "allocated": plan.allocated,
        "budget": plan.budget,
        "fits": plan.fits,
        "max_micro_batch": advice.max_micro_batch,
        "longest_sequence": advice.max_length,
        "best_switch": advice.best_switch,
    }


def run_plan_command(recipe_path: str, overrides: list[str], gpu_memory: str | None, as_json: bool) -> int:
    recipe, precision = resolve_recipe_precision(load_recipe(recipe_path, overrides=overrides), planning_hardware())
    if gpu_memory:
        budget = parse_size(gpu_memory, "--gpu-memory")
    else:
        budget = parse_size(recipe.training.memory_budget or DEFAULT_BUDGET, "training.memory_budget")
    plan = recipe_plan(recipe, budget)
    advice = advise(plan)
    if as_json:
        print(json.dumps(plan_json(plan, advice, precision), indent=2))
    else:
        print(plan_table(plan, precision))
        print()
        print(advice_text(plan, advice))
        if recipe.task == "classification":  # not silently wrong: the terms are a causal LM's
            print("\ntask classification: planned as a causal LM of the same base; a classifier's head and loss")
            print("are smaller than the LM head's chunked loss, so its peak is at or below this plan.")
    return 0
