"""What a sharded launch (FSDP, DeepSpeed ZeRO-3) refuses, in one place: `train` refuses it when so launched
(model.check_sharded_quantization), and `plan --gpus N`, which plans an FSDP launch of the recipe, refuses a
method no such launch runs and names what else the recipe must change before that launch would start."""

from __future__ import annotations

from qlora_pipe.errors import UserError
from qlora_pipe.machine.hardware import with_resolved_precision
from qlora_pipe.recipe.methods import kind_of

METHOD = "method"
AUTO_MICRO_BATCH = "training.micro_batch_size"


def sharded_refusals(recipe, launch: str) -> list[tuple[str, str]]:
    """(recipe key, one-line reason) for each setting a ``launch`` ('fsdp' or 'deepspeed') of this recipe
    refuses, in the order train checks them; none: it may start."""
    q = with_resolved_precision(recipe).quantization
    out = []
    if q.enabled and q.quant_storage != q.compute_dtype:
        out.append(
            (
                "quantization.quant_storage",
                f"quantization.quant_storage: {launch} with 4-bit weights needs quant_storage = compute_dtype "
                f"({q.compute_dtype}), got {q.quant_storage}",
            )
        )
    if reason := kind_of(recipe).not_sharded:
        out.append(
            (
                METHOD,
                f"method: {recipe.method} under a {launch} launch is not supported ({reason}); "
                "launch it with accelerate/ddp.yaml or torchrun",
            )
        )
    if recipe.training.micro_batch_size == "auto":
        out.append(
            (
                AUTO_MICRO_BATCH,
                f"training.micro_batch_size: auto probes one process's step, not a {launch} step across processes; "
                "give a number (qlora-pipe plan RECIPE --gpus N shows what fits)",
            )
        )
    if recipe.training.tiled_mlp is True:
        out.append(
            (
                "training.tiled_mlp",
                f"training.tiled_mlp: the tiled MLP has not been run under a {launch} launch; set it to false or auto "
                "(auto leaves it off there)",
            )
        )
    if launch == "fsdp" and recipe.hub.push_checkpoints:
        out.append(
            (
                "hub.push_checkpoints",
                "hub.push_checkpoints: under fsdp a checkpoint holds each process's shard of the adapter, not a "
                "PEFT adapter to push; the finished run's adapter is pushed with hub.push_adapter_at_end",
            )
        )
    return out


def refuse_sharded(recipe, launch: str) -> None:
    """A launch of this kind refuses the recipe's first setting it cannot run, in one line."""
    refusals = sharded_refusals(recipe, launch)
    if refusals:
        raise UserError(refusals[0][1])


def planned_fsdp_changes(recipe, gpus: int) -> list[str]:
    """For `plan --gpus N`: refuses a method no FSDP launch runs (a plan of it would be of nothing that can
    start); returns what else an FSDP launch of the recipe refuses as it stands. micro_batch_size auto is no
    such thing here: the plan answers it with the number that fits."""
    refusals = dict(sharded_refusals(recipe, "fsdp"))
    if METHOD in refusals:
        raise UserError(f"plan --gpus {gpus}: {refusals[METHOD]} (planned without --gpus: what each DDP process holds)")
    return [reason for key, reason in refusals.items() if key != AUTO_MICRO_BATCH]
