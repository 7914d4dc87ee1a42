"""plan-vs-cpu's planned side: the planner's terms beside a measured step, as a table; a stored measurement
planned again (``--replan``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# TRL 1.16's fused LM head without Triton (on a CPU) computes each [tokens x 32768] tile with torch ops: its
# backward (trl/kernels/chunked_logprob.py, _backward_tile) holds the scaled logits, the log-probabilities, the
# probabilities, the gradient and two temporaries beside the tile, each as large, where the GPU's Triton kernel
# holds the tile alone (the one the plan counts).
CPU_TILE_TEMPORARIES = 6


def compare(found: dict[str, Any], recipe, loss_tile: int = 4096) -> dict[str, Any]:
    """The plan's terms beside the measurement. The step is planned as on a GPU, and again with the CPU-only
    temporaries of TRL's LM head (``loss_tile`` tokens per tile, the tile this run used)."""
    from qlora_pipe.plan.advice import recipe_plan
    from qlora_pipe.plan.layer_bytes import layer_transient_bytes
    from qlora_pipe.plan.terms import VOCAB_TILE, loss_bytes

    batch, length = found["batch_shape"]
    plan = recipe_plan(recipe, None, micro_batch_size=batch, max_length=length)
    terms = dict(plan.terms)
    s = plan.settings
    planned_weights = sum(terms[name] for name in terms if name.startswith("base weights")) + terms["LoRA weights"]
    planned_states = sum(b for name, b in terms.items() if name.startswith("optimizer states"))
    held = terms["LoRA gradients"] + terms["activations kept"]
    layer = layer_transient_bytes(plan.shape, s)
    tile = min(batch * length, loss_tile) * VOCAB_TILE * s.compute_bytes
    loss = loss_bytes(plan.shape, batch * length, s.compute_bytes, loss_tile)
    loss_cpu = loss + CPU_TILE_TEMPORARIES * tile
    planned_step = held + max(layer, loss)
    weights = found["weights"]["quantized"] + found["weights"]["other"]
    rows = {
        "weights (4-bit + not quantized + LoRA)": (planned_weights, weights),
        "optimizer states": (planned_states, found["optimizer_states"]),
        "step peak (gradients + activations + transient)": (planned_step, found["step_peak"]),
    }
    total_planned = planned_weights + planned_states + planned_step
    total_measured = weights + found["optimizer_states"] + found["step_peak"]
    rows["step peak + the CPU's LM-head tile temporaries"] = (held + max(layer, loss_cpu), found["step_peak"])
    rows["allocated in all"] = (total_planned, total_measured)
    return {
        "settings": {
            "micro_batch_size": batch,
            "tokens_per_row": length,
            "precision": s.precision,
            "compute_bytes": s.compute_bytes,
            "optimizer": s.optimizer,
            "tiled_mlp": s.tiled_mlp,
            "lora_dropout": s.lora_dropout,
            "loss_token_tile": loss_tile,
        },
        "rows": {
            name: {"planned": p, "measured": m, "difference": (p - m) / m if m else None}
            for name, (p, m) in rows.items()
        },
        "step_parts": {
            "gradients + activations kept": held,
            "layer backward": layer,
            "loss (GPU)": loss,
            "loss with the CPU's tile temporaries": loss_cpu,
        },
        "plan_terms": terms,
    }


def measured_of(result: dict[str, Any]) -> dict[str, Any]:
    """What a result measured (its planned side aside), as ``compare`` takes it."""
    rows = result["rows"]
    weights = rows["weights (4-bit + not quantized + LoRA)"]["measured"]
    return {
        "batch_shape": [result["settings"]["micro_batch_size"], result["settings"]["tokens_per_row"]],
        "weights": {"quantized": weights, "other": 0},
        "optimizer_states": rows["optimizer states"]["measured"],
        "step_peak": rows["step peak (gradients + activations + transient)"]["measured"],
    }


def replan(path: Path) -> dict[str, Any]:
    """A result's measurement against the planner as it is now (the measurement is not repeated)."""
    from qlora_pipe.recipe import validate_recipe

    result = json.loads(path.read_text())
    recipe = validate_recipe(result["recipe"], str(path))
    kept = {k: v for k, v in result.items() if k not in ("rows", "step_parts", "plan_terms", "settings")}
    return compare(measured_of(result), recipe, result["settings"]["loss_token_tile"]) | kept


def table(result: dict[str, Any]) -> str:
    lines = [f"{'':50s} {'planned':>11s} {'measured':>11s} {'difference':>10s}"]
    for name, row in result["rows"].items():
        diff = "" if row["difference"] is None else f"{100 * row['difference']:+.1f}%"
        lines.append(f"{name:50s} {row['planned'] / 2**30:8.3f} GiB {row['measured'] / 2**30:8.3f} GiB {diff:>10s}")
    return "\n".join(lines)
