"""`qlora-pipe plan`: the memory plan of a recipe as a table (or JSON), with advice."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.machine.hardware import PrecisionChoice, planning_hardware, resolve_recipe_precision
from qlora_pipe.machine.shard_rules import planned_fsdp_changes
from qlora_pipe.plan.advice import Advice, advise, fewest_gpus, longest_by_switches, parse_size, recipe_plan
from qlora_pipe.plan.fsdp import fsdp_header
from qlora_pipe.plan.layer_bytes import offloaded_host_bytes
from qlora_pipe.plan.long_context import SWITCHES as LONG_SWITCHES
from qlora_pipe.plan.terms import GiB, MemoryPlan, plan_memory
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
    if s.gpus > 1:
        lines.append(fsdp_header(s))
    lines.append("")
    for name, size in plan.terms:
        lines.append(f"  {name:<{width}} {gib(size):>11}   {plan.notes.get(name, '')}")
    lines.append(f"  {'total (predicted peak)':<{width}} {gib(plan.total):>11}")
    if plan.budget is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        label = "budget per GPU" if s.gpus > 1 else "budget"
        lines.append(f"  {label:<{width}} {gib(plan.budget):>11}   {verdict}, headroom {gib(plan.headroom)}")
    return "\n".join(lines)


def switch_lines(plan: MemoryPlan) -> list[str]:
    """The long-context switches of this plan, the host memory offloading takes, and the longest sequence at
    micro batch 1 for each combination of the switches (plan/long_context.py)."""
    s = plan.settings
    state = ", ".join(f"{key} {'on' if getattr(s, name) else 'off'}" for name, key in LONG_SWITCHES.items())
    lines = [f"long-context switches in this plan: {state}"]
    if host := offloaded_host_bytes(plan.shape, s):
        lines.append(f"host memory the offloaded activations take (pinned): {gib(host)}")
    if plan.budget is not None and s.gpus == 1:
        lines.append(f"longest sequence at micro batch 1 in {gib(plan.budget)}, by switch:")
        for row in longest_by_switches(plan.shape, s, plan.budget):
            tokens = f"{row.longest:,} tokens" if row.longest else "none"
            lines.append(f"  {row.label:<38} {tokens:>14}")
    return lines


def advice_text(plan: MemoryPlan, advice: Advice) -> str:
    s = plan.settings
    lines = [
        f"largest micro batch at {s.max_length} tokens: {advice.max_micro_batch or 'none'}",
        f"longest sequence at micro batch {s.micro_batch_size}: {advice.max_length or 'none'} tokens",
        *switch_lines(plan),
    ]
    if advice.best_switch:
        outcome = "fits" if advice.switch_fits else "still does not fit"
        lines.append(f"biggest saving: --set {advice.best_switch} (-{gib(advice.best_saving)}, {outcome})")
    if s.gpus > 1:
        fewest = fewest_gpus(plan)
        lines.append(f"fewest GPUs that fit at these settings: {fewest or 'none up to 64'}")
        if not plan.fits and not s.cpu_offload:
            offload = plan_memory(plan.shape, replace(s, cpu_offload=True), plan.budget)
            outcome = "fits" if offload.fits else "still does not fit"
            lines.append(f"with --cpu-offload (fsdp_offload_params: true): {gib(offload.total)}, {outcome}")
    return "\n".join(lines)


def plan_json(plan: MemoryPlan, advice: Advice, precision: PrecisionChoice | None = None) -> dict[str, Any]:
    report = {
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
        "tiled_mlp": plan.settings.tiled_mlp,
        "activation_offloading": plan.settings.activation_offloading,
        "offloaded_host_bytes": offloaded_host_bytes(plan.shape, plan.settings),
    }
    if plan.budget is not None and plan.settings.gpus == 1:
        rows = longest_by_switches(plan.shape, plan.settings, plan.budget)
        report["longest_by_switches"] = {row.label: row.longest for row in rows}
    if plan.settings.gpus > 1:  # per GPU; one GPU's JSON stays as it was
        report |= {
            "gpus": plan.settings.gpus,
            "cpu_offload": plan.settings.cpu_offload,
            "fewest_gpus": fewest_gpus(plan),
        }
    return report


def parse_gpus(text: str | None, cpu_offload: bool = False) -> int:
    """--gpus: a whole number of GPUs, 1 or more (1: the one-GPU plan)."""
    if text is None:
        gpus = 1
    elif not text.strip().isdigit() or int(text) < 1:
        raise UserError(f"--gpus: expected a whole number of GPUs, 1 or more (got {text!r})")
    else:
        gpus = int(text)
    if cpu_offload and gpus < 2:
        raise UserError("--cpu-offload: FSDP's CPU offload needs --gpus 2 or more")
    return gpus


def run_plan_command(
    recipe_path: str,
    overrides: list[str],
    gpu_memory: str | None,
    as_json: bool,
    gpus: str | None = None,
    cpu_offload: bool = False,
) -> int:
    from qlora_pipe.methods import method_for

    n_gpus = parse_gpus(gpus, cpu_offload)
    recipe, precision = resolve_recipe_precision(load_recipe(recipe_path, overrides=overrides), planning_hardware())
    if refusal := method_for(recipe).plan_refusal():
        raise UserError(refusal)
    changes = planned_fsdp_changes(recipe, n_gpus) if n_gpus > 1 else []  # refuses GRPO: no FSDP launch runs it
    if gpu_memory:
        budget = parse_size(gpu_memory, "--gpu-memory")
    else:
        budget = parse_size(recipe.training.memory_budget or DEFAULT_BUDGET, "training.memory_budget")
    plan = recipe_plan(recipe, budget, gpus=n_gpus, cpu_offload=cpu_offload)
    advice = advise(plan)
    if as_json:
        print(json.dumps(plan_json(plan, advice, precision) | ({"fsdp_refuses": changes} if changes else {}), indent=2))
    else:
        print(plan_table(plan, precision))
        for reason in changes:  # the plan is of the launch once changed; as the recipe stands it would not start
            print(f"an FSDP launch refuses this recipe as it stands: {reason}")
        print()
        print(advice_text(plan, advice))
        from qlora_pipe.methods import method_for

        if note := method_for(recipe).plan_note():  # not silently wrong: the terms are a causal LM's
            print(f"\n{note}")
    return 0
