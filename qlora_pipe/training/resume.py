"""Resuming: which checkpoint, and whether the recipe still describes the same training."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import Recipe, resolve_paths, validate_recipe
from qlora_pipe.runs import RunDir, write_text_atomic
from qlora_pipe.training.checkpoints import checkpoint_problem, latest_valid_checkpoint, read_marker

log = logging.getLogger(__name__)

# Changing these changes what is being trained, the order it is seen in, or how the update is computed
# (the restored optimizer and scheduler would silently keep the old learning rate): refuse to resume.
BINDING = ("model", "quantization", "lora", "data", "seed", "training")
HARMLESS_DATA = ("num_proc", "cache_dir")
# Training keys a resumed run applies from the new recipe (recorded in recipe.resolved.yaml, with a notice):
# how long to train, how often to log, evaluate and save, and how the machine runs it.
APPLIED_ON_RESUME = (
    "max_steps",
    "num_epochs",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "max_bad_steps",
    "report_to",
    "preview_prompts",
    "preview_max_new_tokens",
    "cpu_threads",
    "memory_budget",
    "auto_micro_batch_start",
)


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: value}


def all_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    old_flat, new_flat = _flatten(old, ""), _flatten(new, "")
    return {
        key: (old_flat.get(key), new_flat.get(key))
        for key in sorted(set(old_flat) | set(new_flat))
        if old_flat.get(key) != new_flat.get(key)
    }


def _applied(key: str) -> bool:
    section, _, name = key.partition(".")
    if section == "data":
        return name in HARMLESS_DATA
    if section == "training":
        return name in APPLIED_ON_RESUME
    return section not in BINDING


def recipe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The binding differences between the recipe a run started with and the one resuming it."""
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in all_differences(old, new).items() if not _applied(k)]


def applied_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The changes a resumed run takes from the new recipe (and records)."""
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in all_differences(old, new).items() if _applied(k)]


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_same_data(run: RunDir, fingerprint: str | None) -> None:
    """The data files may not change under a run: resume compares their fingerprint with the recorded one."""
    recorded = (
        json.loads(run.data_fingerprint.read_text()).get("fingerprint") if run.data_fingerprint.is_file() else None
    )
    if recorded is None or fingerprint is None:
        return  # a run from before fingerprints were recorded, or Hub data without a pinned revision
    if recorded != fingerprint:
        raise UserError(
            f"cannot resume {run.root}: the training data changed since the run started (data fingerprint "
            f"{recorded} -> {fingerprint}); restore the files or start a new run"
        )


def recorded_recipe(run: RunDir) -> dict[str, Any]:
    """The recipe the run recorded, its paths absolute as a resumed recipe's are (a run recorded before paths
    were resolved has them relative to the working directory, which resolves them the same way)."""
    old = yaml.safe_load(run.resolved_recipe.read_text())
    try:
        return resolve_paths(validate_recipe(old, str(run.resolved_recipe))).model_dump(mode="json")
    except UserError:  # recorded by another version of the schema: compared as written
        return old


def check_resumable(recipe: Recipe, run: RunDir) -> None:
    if not run.resolved_recipe.is_file():
        raise UserError(f"nothing to resume: {run.root} has no {run.resolved_recipe.name}")
    old = recorded_recipe(run)
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
    that was not loaded from a file (the Python API), the run's own resolved recipe; launched as this run
    was (the same torchrun / accelerate launch, whose process count the checkpoint needs)."""
    from qlora_pipe.machine.launch import cli_command, several_machines

    if recipe.source and Path(recipe.source).is_file():
        sets = [part for item in recipe.overrides for part in ("--set", item)]
        args = ["train", recipe.source, *sets, "--resume"]
    else:
        args = ["train", str(run.resolved_recipe), "--resume"]
    command = cli_command(args)
    return f"{command} (on every machine, with its own --machine_rank / --node_rank)" if several_machines() else command


def resolve_checkpoint(run: RunDir, path: str | None) -> Path:
    """The checkpoint to resume from: the given one (checked) or the latest complete one, written by a
    launch of as many processes as this one."""
    if path:
        checkpoint = Path(path)
        problem = checkpoint_problem(checkpoint) if checkpoint.is_dir() else "not a directory"
        if problem:
            raise UserError(f"cannot resume from {checkpoint}: {problem}")
    else:
        checkpoint = latest_valid_checkpoint(run.checkpoints)
        if checkpoint is None:
            raise UserError(f"nothing to resume: no complete checkpoint under {run.checkpoints}")
    check_same_processes(checkpoint, run)
    return checkpoint


def check_same_processes(checkpoint: Path, run: RunDir) -> None:
    """A checkpoint resumes only under as many processes as wrote it: each process's batches (so the
    effective batch and the data order), its RNG state and, under FSDP, its shard depend on that number."""
    from qlora_pipe.machine.dist import world_size

    marker = read_marker(checkpoint)
    saved, now = marker.get("processes"), world_size()
    if saved is not None and saved != now:
        launch = f"{marker['sharding'].upper()} " if marker.get("sharding") else ""
        recorded = _recorded_resume_command(run)
        how = f": {recorded}" if recorded else f" (--num_processes {saved} / --nproc_per_node {saved})"
        raise UserError(
            f"cannot resume from {checkpoint}: it was saved by a {launch}launch of {saved} processes, this "
            f"launch has {now}; resume with {saved} processes{how}"
        )


def _recorded_resume_command(run: RunDir) -> str | None:
    """The launch an interrupted run printed (status.json), if it stopped that way."""
    try:
        return json.loads(run.status.read_text()).get("resume_command")
    except (OSError, ValueError, AttributeError):
        return None


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


def record_applied_changes(run: RunDir, recipe: Recipe, step: int) -> None:
    """Changes a resume applies (max_steps, logging, ...) are said once and written into recipe.resolved.yaml."""
    old = yaml.safe_load(run.resolved_recipe.read_text())
    changes = applied_differences(old, recipe.model_dump(mode="json"))
    if changes:
        log.warning("resuming at step %d with changed settings: %s", step, "; ".join(changes))
        write_text_atomic(run.resolved_recipe, recipe.dump_yaml())
