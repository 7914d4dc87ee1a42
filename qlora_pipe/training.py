"""The training stage: recipe -> SFTConfig -> SFTTrainer -> adapter in the run directory.

``run_training`` reads as the list of stages it runs. Data formatting lives in data.py, model
loading in model.py; this module maps the recipe onto TRL and records what happened.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from qlora_pipe.auto_sizes import memory_budget, resolve_max_length
from qlora_pipe.autobatch import BatchChoice, choose_batch
from qlora_pipe.checkpoints import latest_valid_checkpoint, read_marker, step_of
from qlora_pipe.data import PreparedData, prepare_data
from qlora_pipe.dist import is_main_process, world_size
from qlora_pipe.errors import Interrupted, UserError
from qlora_pipe.hardware import (
    PrecisionChoice,
    ThreadChoice,
    apply_cpu_threads,
    cpu_flags,
    detect_hardware,
    isa_summary,
    resolve_recipe_precision,
    with_resolved_precision,
)
from qlora_pipe.model import load_tokenizer, load_trainable_model, training_device
from qlora_pipe.plots import plot_losses
from qlora_pipe.preview import generate_answers
from qlora_pipe.progress import peak_memory_bytes
from qlora_pipe.recipe import Recipe
from qlora_pipe.resume import check_resumable, resolve_checkpoint
from qlora_pipe.runs import RunDir, write_json_atomic, write_text_atomic
from qlora_pipe.signals import StopAtStepBoundary, graceful_stop
from qlora_pipe.speed import check_speed_switches
from qlora_pipe.trainer import TrainingAborted

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl", "qlora-pipe")


@dataclass
class TrainResult:
    run_dir: RunDir
    summary: dict[str, Any]
    model: Any = None  # the trained PeftModel, still in memory (for notebooks and checks)
    tokenizer: Any = None


def sft_config(recipe: Recipe, run: RunDir, device: torch.device, batch: BatchChoice, resuming: bool = False):
    """The one place where recipe names become TRL/transformers argument names."""
    from trl import SFTConfig

    t = with_resolved_precision(recipe, detect_hardware(device.type)).training
    on_cpu = device.type == "cpu"
    optimizer = t.optimizer
    if on_cpu and optimizer.startswith("paged_"):
        # Paging moves optimizer state between GPU and CPU memory; with no GPU there is nothing to page.
        optimizer = optimizer.removeprefix("paged_")
        log.warning("no GPU: optimizer %s runs as %s (paging needs CUDA)", t.optimizer, optimizer)
    evaluating = recipe.data.has_eval() and t.eval_steps is not None
    return SFTConfig(
        output_dir=str(run.checkpoints),
        seed=recipe.seed,
        data_seed=recipe.seed,
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        per_device_train_batch_size=batch.micro_batch_size,
        per_device_eval_batch_size=batch.micro_batch_size,
        gradient_accumulation_steps=batch.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        # Enabled (non-reentrant) by the model stage; the trainer must not wrap it a second time.
        gradient_checkpointing=False,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluating else "no",
        # The "before" eval runs inside train(), after the model is wrapped for DDP: a trainer.evaluate()
        # before train() marks the model as prepared and DDP would then silently never wrap it.
        eval_on_start=recipe.data.has_eval() and not resuming,
        eval_steps=t.eval_steps if evaluating else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # PipeTrainer rotates, after the completion marker is written
        # TensorBoard is attached by build_trainer, writing into the run directory.
        report_to=[r for r in t.report_to if r not in ("tensorboard", "none")] or "none",
        metric_for_best_model="eval_loss" if evaluating else None,
        greater_is_better=False if evaluating else None,
        # data.py already dropped or truncated rows to data.max_length; TRL refuses a max_length it cannot
        # enforce (padding-free without packing), so it gets None there.
        max_length=None if t.padding_free and not recipe.data.packing else recipe.data.max_length,
        # data.py hands over input_ids and labels already masked per data.loss_on; TRL only packs and collates.
        assistant_only_loss=False,
        completion_only_loss=False,
        packing=recipe.data.packing,
        packing_strategy="bfd",
        dataset_num_proc=recipe.data.num_proc,
        use_cpu=on_cpu,
        dataloader_num_workers=0,
        # Speed and memory switches (checked by speed.check_speed_switches before anything loads).
        padding_free=t.padding_free,
        use_liger_kernel=t.liger_kernels,
        activation_offloading=t.activation_offloading,
        torch_compile=t.torch_compile,
        # No chunked-loss switch: TRL 1.16's SFTTrainer always computes the loss with its chunked fused LM
        # head (no full-vocabulary logits), and it rejects Liger's fused linear cross-entropy.
    )


class PushCheckpoints(TrainerCallback):
    """hub.push_checkpoints: hand each saved (and completed) checkpoint to the Hub pusher."""

    def __init__(self, pusher) -> None:
        self.pusher = pusher

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.pusher.push(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)


class MetricsRecorder(TrainerCallback):
    """Appends every log event (train and eval) to metrics.jsonl, one JSON object per line."""

    def __init__(self, run: RunDir) -> None:
        self.path = run.metrics

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            row = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")


def check_trackers(recipe: Recipe) -> None:
    """Each requested tracker must be importable, before anything expensive happens."""
    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
    for tracker in recipe.training.report_to:
        if tracker in modules and importlib.util.find_spec(modules[tracker]) is None:
            raise UserError(f"training.report_to: {tracker} is not installed (pip install {modules[tracker]})")


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
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from qlora_pipe.progress import RunProgress
    from qlora_pipe.trainer import PipeTrainer

    trainer = PipeTrainer(
        model=model,
        args=sft_config(recipe, run, training_device(), batch or choose_batch(recipe, run, model), resuming),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[MetricsRecorder(run), *callbacks],
        max_bad_steps=recipe.training.max_bad_steps,
        keep_checkpoints=recipe.training.save_total_limit,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(RunProgress(trainer, label))
    if "tensorboard" in recipe.training.report_to:
        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(run.tensorboard)
        trainer.add_callback(tensorboard)
    return trainer


def save_adapter(model, tokenizer, run: RunDir) -> None:
    """Write adapter and tokenizer to a temporary directory, then move them into the run."""
    tmp = run.root / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    for item in tmp.iterdir():
        item.replace(run.root / item.name)
    tmp.rmdir()


def run_training(
    recipe: Recipe, overwrite: bool = False, resume: bool | str = False, callbacks: tuple = ()
) -> TrainResult:
    """Data and model checks, then train, save, and summarise. Returns the finished run.

    ``resume``: True for the latest complete checkpoint of the run, or a checkpoint path.
    ``callbacks``: extra transformers TrainerCallbacks (e.g. for notebooks or fault injection).
    """
    from transformers import set_seed

    started = time.time()
    main = is_main_process()
    recipe, compute = resolve_compute(recipe)
    recipe = resolve_max_length(recipe, memory_budget(recipe))
    if world_size() > 1 and recipe.training.micro_batch_size == "auto":
        raise UserError("training.micro_batch_size: 'auto' probes one device; with several processes give a number")
    run = RunDir(recipe.run_dir())
    checkpoint = None
    if resume:  # before any expensive loading
        check_resumable(recipe, run)
        checkpoint = resolve_checkpoint(run, resume if isinstance(resume, str) else None)
    elif main:
        run.check_available(overwrite=overwrite)
    check_trackers(recipe)
    check_speed_switches(recipe)
    set_seed(recipe.seed)
    tokenizer = load_tokenizer(recipe)
    data = prepare_data(recipe.data, tokenizer, recipe.seed)  # data errors surface before the model loads
    set_seed(recipe.seed)
    _, trainable = load_trainable_model(recipe, tokenizer)

    if checkpoint is not None:
        check_trainable_count(checkpoint, trainable.trainable_params)
        log.info("resuming from %s", checkpoint)
    if main:  # only the first process writes the run's files
        if checkpoint is None:
            run.prepare(overwrite=overwrite)
            write_text_atomic(run.resolved_recipe, recipe.dump_yaml())
        else:
            truncate_metrics(run, step_of(checkpoint))
        run.set_status("running", started=started, resumed_from=str(checkpoint) if checkpoint else None)
        write_json_atomic(run.data_report, [r.as_dict() for r in data.reports])
    batch = choose_batch(recipe, run, trainable.model)
    try:
        summary = _train_and_save(
            recipe, run, trainable, tokenizer, data, started, checkpoint, callbacks, batch, compute
        )
    except Interrupted as exc:
        if main:
            run.set_status("interrupted", step=exc.step, signal=exc.signal_name)
        raise
    except BaseException as exc:
        if main:
            run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    return TrainResult(run, summary, trainable.model, tokenizer)


@dataclass(frozen=True)
class Compute:
    """How this run computes: the dtypes (resolved from auto) and, on CPU, the threads."""

    precision: PrecisionChoice
    threads: ThreadChoice | None

    def label(self) -> str:
        """A few words for the progress line, e.g. 'fp32, 2 threads'."""
        return self.precision.precision + (f", {self.threads.threads} threads" if self.threads else "")

    def as_dict(self) -> dict[str, Any]:
        threads = (
            {"cpu_threads": self.threads.threads, "cpu_threads_reason": self.threads.reason} if self.threads else {}
        )
        return {**self.precision.as_dict(), **threads}


def resolve_compute(recipe: Recipe) -> tuple[Recipe, Compute]:
    """precision/compute_dtype auto -> the dtype the hardware runs natively; CPU threads. Logged once."""
    hardware = detect_hardware(training_device().type)
    recipe, precision = resolve_recipe_precision(recipe, hardware)
    threads = apply_cpu_threads(recipe.training.cpu_threads) if hardware.kind == "cpu" else None
    if is_main_process():
        log.info("precision: %s, compute dtype %s (%s)", precision.precision, precision.compute_dtype, precision.reason)
        if precision.notice:
            log.warning("notice: %s", precision.notice)
        if threads:
            log.info("CPU threads: %d (%s)", threads.threads, threads.reason)
    return recipe, Compute(precision, threads)


def device_description(device: torch.device) -> dict[str, str]:
    """The device numbers came from: GPU name, or CPU model and the vector extensions that decide its speed."""
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name()}
    hardware = detect_hardware("cpu")
    return {"device": hardware.name, "cpu_isa": isa_summary(cpu_flags()), "cpu_bf16": hardware.detail}


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


def _answers_before(recipe, run, model, tokenizer, data, resuming: bool) -> list[str]:
    """Preview answers of the untrained model; generated once (first process) and kept for resumed runs."""
    path = run.root / "baseline.json"
    if resuming and path.is_file():
        return json.loads(path.read_text())["answers"]
    prompts = recipe.training.preview_prompts
    if not prompts or not is_main_process():
        return []
    answers = generate_answers(model, tokenizer, prompts, data.system_prompt, recipe.training.preview_max_new_tokens)
    write_json_atomic(path, {"answers": answers})
    return answers


def eval_loss_before(run: RunDir) -> float | None:
    """The evaluation at step 0 (eval_on_start), as recorded in metrics.jsonl (survives resumes)."""
    if not run.metrics.is_file():
        return None
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    return next((r["eval_loss"] for r in rows if r.get("step") == 0 and "eval_loss" in r), None)


def _train_and_save(
    recipe, run, trainable, tokenizer, data, started, checkpoint, callbacks, batch, compute: Compute
) -> dict[str, Any]:
    device = training_device()
    model = trainable.model
    prompts = recipe.training.preview_prompts
    with graceful_stop() as stop:
        callbacks = (StopAtStepBoundary(stop), *callbacks)
        if recipe.hub.push_checkpoints and is_main_process():
            from qlora_pipe.hub import CheckpointPusher

            callbacks = (*callbacks, PushCheckpoints(CheckpointPusher(recipe.hub.repo_id, recipe.hub.private)))
        trainer = build_trainer(
            recipe, run, model, tokenizer, data, callbacks, batch, checkpoint is not None, compute.label()
        )
        before = _answers_before(recipe, run, model, tokenizer, data, resuming=checkpoint is not None)
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
            f"stopped by {stop.signal_name} at step {step}; checkpoint saved. Resume with: "
            f"qlora-pipe train {recipe.source or 'RECIPE'} --resume",
            step,
            stop.signal_name,
        )
    eval_after = trainer.evaluate()["eval_loss"] if data.eval is not None else None
    supervised_tokens = trainer.total_supervised_tokens()  # a collective: every process calls it
    if not is_main_process():
        return {}

    after = generate_answers(model, tokenizer, prompts, data.system_prompt, recipe.training.preview_max_new_tokens)
    if prompts:
        pairs = zip(prompts, before, after, strict=True)
        rows = [{"prompt": p, "before": b, "after": a} for p, b, a in pairs]
        write_json_atomic(run.preview, rows)
        print_preview(rows)

    save_adapter(model, tokenizer, run)
    curve = plot_losses(run.metrics, run.loss_curve, f"{recipe.run_name}: {recipe.model.name_or_path}")
    evals = [(row["eval_loss"], row["step"]) for row in trainer.state.log_history if "eval_loss" in row]
    best_loss, best_step = min(evals) if evals else (None, None)
    train_losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    summary = {
        "run_name": recipe.run_name,
        "base_model": recipe.model.name_or_path,
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
    if recipe.hub.push_adapter_at_end:
        push_at_end(recipe, run)
    return summary


def push_at_end(recipe: Recipe, run: RunDir) -> None:
    """The recipe's hub section asked for it. A failed push never un-finishes the run: it says how to retry."""
    from qlora_pipe.hub import push_run

    try:
        push_run(run.root, recipe.hub.repo_id, "adapter", private=recipe.hub.private)
    except UserError as exc:
        log.error("the run finished, but %s", exc)


def print_preview(rows: list[dict[str, str]]) -> None:
    print("\n=== answers before and after fine-tuning ===")
    for row in rows:
        print(f"\nQ: {row['prompt']}\n  before: {row['before']!r}\n  after:  {row['after']!r}")
    print()
