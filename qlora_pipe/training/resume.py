"""Resuming: which checkpoint, and whether the recipe still describes the same training."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import Recipe
from qlora_pipe.runs import RunDir, write_text_atomic
from qlora_pipe.training.checkpoints import checkpoint_problem, latest_valid_checkpoint, read_marker

# Changing these changes what is being trained or the order it is seen in: refuse to resume.
BINDING = ("model", "quantization", "lora", "data", "seed")
BINDING_TRAINING = (
    "micro_batch_size",
    "gradient_accumulation_steps",
    "effective_batch_size",
    "optimizer",
    "precision",
)
HARMLESS_DATA = ("num_proc", "cache_dir")


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: value}


def recipe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The binding differences between the recipe a run started with and the one resuming it."""
    keys = [k for k in BINDING] + [f"training.{k}" for k in BINDING_TRAINING]
    old_flat = {k: v for key in keys for k, v in _flatten(_get(old, key), key).items()}
    new_flat = {k: v for key in keys for k, v in _flatten(_get(new, key), key).items()}
    harmless = {f"data.{k}" for k in HARMLESS_DATA}
    return [
        f"{key}: {old_flat.get(key)!r} -> {new_flat.get(key)!r}"
        for key in sorted(set(old_flat) | set(new_flat))
        if key not in harmless and old_flat.get(key) != new_flat.get(key)
    ]


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_resumable(recipe: Recipe, run: RunDir) -> None:
    if not run.resolved_recipe.is_file():
        raise UserError(f"nothing to resume: {run.root} has no {run.resolved_recipe.name}")
    old = yaml.safe_load(run.resolved_recipe.read_text())
    differences = recipe_differences(old, recipe.model_dump(mode="json"))
    if differences:
        raise UserError(f"cannot resume {run.root}: the recipe changed what is trained: {'; '.join(differences)}")
    if run.is_finished():
        raise UserError(
            f"cannot resume {run.root}: it already finished (summary.json); to train further, start a new run "
            "(--set run_name=NAME), e.g. from this adapter's recipe with more steps"
        )


def resume_command(recipe: Recipe, run: RunDir) -> str:
    """The command that resumes this run: the recipe file with the same --set overrides, or, for a recipe
    that was not loaded from a file (the Python API), the run's own resolved recipe."""
    if recipe.source and Path(recipe.source).is_file():
        sets = [f"--set {shlex.quote(item)}" for item in recipe.overrides]
        return " ".join(["qlora-pipe train", shlex.quote(recipe.source), *sets, "--resume"])
    return f"qlora-pipe train {shlex.quote(str(run.resolved_recipe))} --resume"


def resolve_checkpoint(run: RunDir, path: str | None) -> Path:
    """The checkpoint to resume from: the given one (checked) or the latest complete one."""
    if path:
        checkpoint = Path(path)
        problem = checkpoint_problem(checkpoint) if checkpoint.is_dir() else "not a directory"
        if problem:
            raise UserError(f"cannot resume from {checkpoint}: {problem}")
        return checkpoint
    checkpoint = latest_valid_checkpoint(run.checkpoints)
    if checkpoint is None:
        raise UserError(f"nothing to resume: no complete checkpoint under {run.checkpoints}")
    return checkpoint


def check_trainable_count(checkpoint: Path, trainable_params: int) -> None:
    saved = read_marker(checkpoint).get("trainable_params")
    if saved is not None and saved != trainable_params:
        raise UserError(
            f"cannot resume from {checkpoint}: it trained {saved:,} parameters, this model has {trainable_params:,}"
        )


def truncate_metrics(run: RunDir, step: int) -> None:
    """Drop metrics logged after the checkpoint: those steps are about to run again."""
    if not run.metrics.is_file():
        return
    rows = [line for line in run.metrics.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
    write_text_atomic(run.metrics, "".join(row + "\n" for row in rows))
