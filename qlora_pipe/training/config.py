"""The one place where recipe names become TRL/transformers argument names (SFTConfig)."""

from __future__ import annotations

import importlib.util
import logging

import torch

from qlora_pipe.errors import UserError
from qlora_pipe.machine.dist import is_main_process, sharded_launch
from qlora_pipe.machine.hardware import detect_hardware, with_resolved_precision
from qlora_pipe.machine.optimizers import optimizer_used
from qlora_pipe.recipe import Recipe
from qlora_pipe.runs import RunDir
from qlora_pipe.training.micro_batch import BatchChoice

log = logging.getLogger(__name__)


def sft_config(recipe: Recipe, run: RunDir, device: torch.device, batch: BatchChoice, resuming: bool = False):
    """The one place where recipe names become TRL/transformers argument names."""
    from trl import SFTConfig

    return SFTConfig(**sft_arguments(recipe, run, device, batch, resuming))


def sft_arguments(recipe: Recipe, run: RunDir, device: torch.device, batch: BatchChoice, resuming: bool) -> dict:
    t = with_resolved_precision(recipe, detect_hardware(device.type)).training
    on_cpu = device.type == "cpu"
    optimizer = optimizer_used(t.optimizer, gpu=not on_cpu, fsdp=sharded_launch() == "fsdp")
    if optimizer.notice and is_main_process():  # one line per launch, not one per process
        log.warning(optimizer.notice)
    evaluating = recipe.data.has_eval() and t.eval_steps is not None
    return dict(
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
        optim=optimizer.name,
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
        # data/prepare.py already dropped or truncated rows to data.max_length; TRL refuses a max_length it cannot
        # enforce (padding-free without packing), so it gets None there.
        max_length=None if t.padding_free and not recipe.data.packing else recipe.data.max_length,
        # data/prepare.py hands over input_ids and labels already masked per data.loss_on; TRL only packs and collates.
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
        activation_offloading=t.activation_offloading is True,  # settled by plan/auto_sizes.py
        torch_compile=t.torch_compile,
        # No chunked-loss switch: TRL 1.16's SFTTrainer always computes the loss with its chunked fused LM
        # head (no full-vocabulary logits), and it rejects Liger's fused linear cross-entropy.
    )


def check_trackers(recipe: Recipe) -> None:
    """Each requested tracker must be importable, before anything expensive happens."""
    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
    for tracker in recipe.training.report_to:
        if tracker in modules and importlib.util.find_spec(modules[tracker]) is None:
            raise UserError(f"training.report_to: {tracker} is not installed (pip install {modules[tracker]})")
