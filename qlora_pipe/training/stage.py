"""The training stage: recipe -> SFTConfig -> SFTTrainer -> adapter in the run directory.

``run_training`` reads as the list of stages it runs. Data formatting lives in data/prepare.py, model
loading in models/loading.py, the trainer config in config.py; this module runs the stages and records what happened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from qlora_pipe.data.prepared import PreparedData
from qlora_pipe.errors import Interrupted, TrainingAborted, UserError
from qlora_pipe.machine.dist import is_main_process, world_size
from qlora_pipe.machine.host_memory import HostMemory
from qlora_pipe.methods import method_for
from qlora_pipe.models.base_record import check_same_base, record_base, recorded_source
from qlora_pipe.models.generation import generate_answers
from qlora_pipe.models.loading import check_sharded_quantization, load_tokenizer, training_device
from qlora_pipe.plan.auto_sizes import resolve_auto_sizes
from qlora_pipe.recipe import Recipe, resolve_paths
from qlora_pipe.runs import RunDir, write_json_atomic, write_text_atomic
from qlora_pipe.training.callbacks import MetricsRecorder
from qlora_pipe.training.checkpoints import latest_valid_checkpoint, read_marker, step_of
from qlora_pipe.training.compute import Compute, device_description, resolve_compute
from qlora_pipe.training.config import check_trackers, sft_arguments
from qlora_pipe.training.method import load_policy
from qlora_pipe.training.micro_batch import choose_batch
from qlora_pipe.training.plots import plot_losses
from qlora_pipe.training.preview_answers import answers_before, print_preview
from qlora_pipe.training.progress import peak_memory_bytes
from qlora_pipe.training.resume import (
    check_resumable,
    check_same_data,
    check_trainable_count,
    record_applied_changes,
    resolve_checkpoint,
    resume_command,
    truncate_metrics,
)
from qlora_pipe.training.sharded import full_adapter_state, is_sharded, save_adapter
from qlora_pipe.training.signals import StopAtStepBoundary, graceful_stop
from qlora_pipe.training.speed_switches import check_speed_switches

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl", "qlora-pipe")


@dataclass
class TrainResult:
    run_dir: RunDir
    summary: dict[str, Any]
    model: Any = None  # the trained PeftModel, still in memory (for notebooks and checks)
    tokenizer: Any = None


def build_trainer(
    recipe: Recipe,
    run: RunDir,
    model,
    tokenizer,
    data: PreparedData,
    callbacks=(),
    batch=None,
    resuming=False,
    label: str = "",
):
    from qlora_pipe.compat.transformers import (
        replace_progress_callbacks,
        tensorboard_callback,
        trackers_skip_missing_values,
    )
    from qlora_pipe.training.progress import RunProgress

    method = method_for(recipe)
    batch = batch or choose_batch(recipe, run, model, method)
    collator = method.data_collator(recipe, tokenizer)
    trainer = method.trainer_class(recipe)(
        model=model,
        args=method.trainer_config(recipe, sft_arguments(recipe, run, training_device(), batch, resuming)),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[MetricsRecorder(run), *method.callbacks(recipe, run, tokenizer, data), *callbacks],
        max_bad_steps=recipe.training.max_bad_steps,
        keep_checkpoints=recipe.training.save_total_limit,
        **({"data_collator": collator} if collator is not None else {}),
    )
    replace_progress_callbacks(trainer, RunProgress(trainer, label))
    if "tensorboard" in recipe.training.report_to:
        trainer.add_callback(tensorboard_callback(run.tensorboard))
    trackers_skip_missing_values(trainer)
    return trainer


def run_training(
    recipe: Recipe, overwrite: bool = False, resume: bool | str = False, callbacks: tuple = (), publisher=None
) -> TrainResult:
    """Data and model checks, then train, save, and summarise. Returns the finished run.

    ``resume``: True for the latest complete checkpoint of the run, or a checkpoint path.
    ``callbacks``: extra transformers TrainerCallbacks (e.g. for notebooks or fault injection).
    ``publisher``: what the recipe's hub section asks (publish/training_push.py's HubPush, handed over by the
    CLI and ``qlora_pipe.train``); without one nothing is pushed, and a hub section that asks says so.
    The run directory belongs to this process while it runs (RunDir.exclusive): a second training into
    it, with or without --overwrite, is refused.
    """
    run = RunDir(recipe.run_dir())
    with run.exclusive() if is_main_process() else contextlib.nullcontext(), HostMemory() as host:
        if publisher is None and (recipe.hub.push_checkpoints or recipe.hub.push_adapter_at_end):
            log.warning("hub: this caller of run_training passed no publisher: nothing will be pushed")
        return _run_training(recipe, overwrite, resume, callbacks, host, publisher)


def _run_training(
    recipe: Recipe, overwrite: bool, resume: bool | str, callbacks: tuple, host: HostMemory, publisher
) -> TrainResult:
    from transformers import set_seed

    started = time.time()
    main = is_main_process()
    recipe, compute = resolve_compute(resolve_paths(recipe))  # recorded with absolute paths: usable from anywhere
    sizes = resolve_auto_sizes(recipe)  # data.max_length and the micro batch start, planned once
    recipe = sizes.recipe
    if world_size() > 1 and recipe.training.micro_batch_size == "auto":
        raise UserError("training.micro_batch_size: 'auto' probes one device; with several processes give a number")
    run = RunDir(recipe.run_dir())
    checkpoint = None
    if resume:  # before any expensive loading
        check_resumable(recipe, run)
        checkpoint = resolve_checkpoint(run, resume if isinstance(resume, str) else None)
        check_same_base(run, recipe, "cannot resume")
    elif main:
        run.check_available(overwrite=overwrite)
    check_trackers(recipe)
    check_speed_switches(recipe)
    check_sharded_quantization(recipe)  # FSDP / ZeRO-3: before the data and the model load
    set_seed(recipe.seed)
    tokenizer = load_tokenizer(recipe)
    method = method_for(recipe)
    data = method.prepare_data(recipe, tokenizer)  # data errors surface before the model loads
    recipe = method.with_data(recipe, data)
    if checkpoint is not None:
        check_same_data(run, data.fingerprint)
    set_seed(recipe.seed)
    trainable = load_policy(recipe, tokenizer)

    if checkpoint is not None:
        check_trainable_count(checkpoint, trainable.trainable_params)
        log.info("resuming from %s", checkpoint)
    if main:  # only the first process writes the run's files
        if checkpoint is None:
            run.prepare(overwrite=overwrite)
            record_base(run, recipe)  # what every later stage checks the base against
            write_text_atomic(run.resolved_recipe, recipe.dump_yaml())
            write_json_atomic(run.data_fingerprint, {"fingerprint": data.fingerprint})
        else:
            truncate_metrics(run, step_of(checkpoint))
            record_applied_changes(run, recipe, step_of(checkpoint))
        run.set_status("running", started=started, resumed_from=str(checkpoint) if checkpoint else None)
        write_json_atomic(run.data_report, [r.as_dict() for r in data.reports])
        write_json_atomic(run.system_prompt, {"system_prompt": data.system_prompt})
    batch = choose_batch(recipe, run, trainable.model, method, sizes.micro_batch_start)
    try:
        summary = _train_and_save(
            recipe, run, trainable, tokenizer, data, started, checkpoint, callbacks, batch, compute, host, publisher
        )
    except Interrupted as exc:
        if main:
            run.record_outcome(
                "interrupted", step=exc.step, signal=exc.signal_name, resume_command=resume_command(recipe, run)
            )
        raise
    except BaseException as exc:
        if main:
            run.record_outcome("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    return TrainResult(run, summary, trainable.model, tokenizer)


def eval_loss_before(run: RunDir) -> float | None:
    """The evaluation at step 0 (eval_on_start), as recorded in metrics.jsonl (survives resumes)."""
    if not run.metrics.is_file():
        return None
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    return next((r["eval_loss"] for r in rows if r.get("step") == 0 and "eval_loss" in r), None)


def _train_and_save(
    recipe, run, trainable, tokenizer, data, started, checkpoint, callbacks, batch, compute: Compute, host, publisher
) -> dict[str, Any]:
    device = training_device()
    model = trainable.model
    prompts = recipe.training.preview_prompts
    with graceful_stop() as stop:
        callbacks = (StopAtStepBoundary(stop), *callbacks)
        if publisher is not None:
            callbacks = (*callbacks, *publisher.checkpoint_callbacks())
        trainer = build_trainer(
            recipe, run, model, tokenizer, data, callbacks, batch, checkpoint is not None, compute.label()
        )
        before = answers_before(recipe, run, model, tokenizer, data, resuming=checkpoint is not None)
        if checkpoint is not None:
            marker = read_marker(checkpoint)
            # The marker holds the count of all processes; the first one carries it forward.
            trainer.supervised_tokens = marker.get("supervised_tokens", 0) if is_main_process() else 0
            trainer.skipped_steps = marker.get("skipped_steps", 0)
        train_started = time.time()
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_seconds = time.time() - train_started
    if trainer.aborted:
        latest = latest_valid_checkpoint(run.checkpoints)
        kept = f"last good checkpoint: {latest}" if latest else "no checkpoint was written yet"
        raise TrainingAborted(f"training stopped: {trainer.aborted}; {kept}")
    if stop.signal_name:
        step = trainer.state.global_step
        raise Interrupted(
            f"stopped by {stop.signal_name} at step {step}; checkpoint saved. "
            f"Resume with: {resume_command(recipe, run)}",
            step,
            stop.signal_name,
        )
    eval_after = trainer.evaluate()["eval_loss"] if data.eval is not None else None
    supervised_tokens = trainer.total_supervised_tokens()  # a collective: every process calls it
    sharded = is_sharded(model)  # FSDP: gathering the adapter and each forward pass are collectives
    adapter = full_adapter_state(model) if sharded else None
    if sharded or is_main_process():
        after = generate_answers(model, tokenizer, prompts, data.system_prompt, recipe.training.preview_max_new_tokens)
    if not is_main_process():
        return {}
    if prompts:
        pairs = zip(prompts, before, after, strict=True)
        rows = [{"prompt": p, "before": b, "after": a} for p, b, a in pairs]
        write_json_atomic(run.preview, rows)
        print_preview(rows)

    save_adapter(model, method_for(recipe).saved_processing(recipe, tokenizer), run, adapter)
    curve = plot_losses(run.metrics, run.loss_curve, f"{recipe.run_name}: {recipe.model.name_or_path}")
    evals = [(row["eval_loss"], row["step"]) for row in trainer.state.log_history if "eval_loss" in row]
    best_loss, best_step = min(evals) if evals else (None, None)
    train_losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    summary = {
        "run_name": recipe.run_name,
        "base_model": recipe.model.name_or_path,
        "base_source": recorded_source(run),
        **method_for(recipe).summary(recipe, run),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "first_train_loss": train_losses[0] if train_losses else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "mean_train_loss": output.training_loss,
        "eval_loss_before": eval_loss_before(run),
        "final_eval_loss": eval_after,
        "best_eval_loss": best_loss,
        "best_eval_step": best_step,
        "loss_curve": curve.name if curve else None,
        "skipped_steps": trainer.skipped_steps,
        "micro_batch_size": batch.micro_batch_size,
        "gradient_accumulation_steps": batch.gradient_accumulation_steps,
        "supervised_tokens": supervised_tokens,
        "processes": world_size(),
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.time() - started, 2),
        "supervised_tokens_per_second": round(supervised_tokens / max(train_seconds, 1e-9), 2),
        "peak_memory_bytes": peak_memory_bytes(),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "host_memory": host.report(),  # load and training: anonymous and memory-mapped files apart
        **device_description(device),
        "compute": compute.as_dict(),
        "trainable_params": trainable.trainable_params,
        "total_params": trainable.total_params,
        "python": sys.version.split()[0],
        "versions": {name: version(name) for name in LIBRARIES},
    }
    # summary.json is the completion marker: written after everything else, atomically.
    write_json_atomic(run.summary, summary)
    run.set_status("finished", finished=time.time())
    if publisher is not None:
        publisher.at_end(run)
    return summary
