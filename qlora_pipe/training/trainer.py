"""TRL's trainers (SFTTrainer; DPOTrainer for preference runs) with the guarantees a long QLoRA run needs.

- counts the tokens that carry loss;
- a non-finite loss or gradient skips the update: no optimizer step (gradients dropped, so the
  optimizers leave their state alone) and no scheduler step; N bad steps in a row stop the run;
- every checkpoint gets a completion marker once it is fully written, and older checkpoints are
  rotated only after that, so a crash mid-save never leaves the run without a good checkpoint;
- a failed save (disk full) is a clear error that leaves the previous checkpoint valid.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from qlora_pipe.compat.torch import all_finite
from qlora_pipe.compat.transformers import TrainerInternals, checkpoint_write_error
from qlora_pipe.compat.trl import keep_adapter_fp32_unless_bf16
from qlora_pipe.training.checkpoints import latest_valid_checkpoint, step_of, write_marker

log = logging.getLogger(__name__)


class BadStepGuard(TrainerCallback):
    """Decides, just before the optimizer step, whether this update is finite enough to apply."""

    def __init__(self, trainer: PipeTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        grads = [p.grad for p in trainer.model.parameters() if p.requires_grad and p.grad is not None]
        finite_grads = all_finite(grads)  # one fused kernel and one host sync (compat/torch.py)
        if trainer.bad_loss_in_step or not finite_grads:
            what = "loss" if trainer.bad_loss_in_step else "gradient"
            for param in trainer.model.parameters():
                param.grad = None  # optimizers skip parameters without a gradient: no state change
            trainer.skip_this_step = True
            trainer.skipped_steps += 1
            trainer.consecutive_bad += 1
            log.warning(
                "step %d: non-finite %s, update skipped (%d in a row, %d in total)",
                state.global_step + 1,
                what,
                trainer.consecutive_bad,
                trainer.skipped_steps,
            )
            if trainer.consecutive_bad >= trainer.max_bad_steps:
                trainer.aborted = (
                    f"{trainer.consecutive_bad} consecutive steps had a non-finite {what} "
                    f"(training.max_bad_steps = {trainer.max_bad_steps}); stopped at step {state.global_step + 1}"
                )
                control.should_training_stop = True
                control.should_save = False
        else:
            trainer.consecutive_bad = 0
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.skip_this_step = False
        self.trainer.bad_loss_in_step = False
        if self.trainer.aborted:
            control.should_save = False
        return control


class CheckpointCompletion(TrainerCallback):
    """After each checkpoint is written: its completion marker, then rotation of older checkpoints.

    Only a checkpoint with a marker counts as complete, so a crash mid-save never leaves the run
    without a good checkpoint, and nothing is rotated away before the new one is complete."""

    def __init__(self) -> None:
        self.trainer: PipeTrainer | None = None  # set once the trainer exists

    def on_save(self, args, state, control, **kwargs):
        trainer = self.trainer
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        supervised = trainer.total_supervised_tokens()  # a collective: every process calls it
        if not args.should_save:
            return
        try:
            write_marker(checkpoint, {**trainer.marker_fields(), "supervised_tokens": supervised})
        except OSError as exc:
            shutil.rmtree(checkpoint, ignore_errors=True)
            raise checkpoint_write_error(checkpoint, exc, latest_valid_checkpoint(checkpoint.parent)) from exc
        trainer.rotate_checkpoints()


class RunGuarantees:
    """The guarantees above, for any TRL trainer (SFTTrainer, DPOTrainer): mixed in before it."""

    def __init__(
        self, *args: Any, max_bad_steps: int = 5, keep_checkpoints: int = 2, callbacks=None, **kwargs: Any
    ) -> None:
        # The marker comes first among the run's callbacks: a checkpoint pushed on save is already complete.
        completion = CheckpointCompletion()
        super().__init__(*args, callbacks=[completion, *(callbacks or [])], **kwargs)
        completion.trainer = self
        self.max_bad_steps = max_bad_steps
        self.keep_checkpoints = keep_checkpoints
        self.supervised_tokens = 0
        self.skipped_steps = 0
        self.consecutive_bad = 0
        self.skip_this_step = False
        self.bad_loss_in_step = False
        self.aborted: str | None = None
        self.add_callback(BadStepGuard(self))
        keep_adapter_fp32_unless_bf16(self.model, self.args.bf16)
        # Remember the adapter dtypes so a resumed run keeps them.
        self.adapter_dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs["skipped_steps"] = self.skipped_steps
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training and "labels" in inputs and inputs["labels"].dim() == 1:  # a classifier: one label per row
            self.supervised_tokens += int(inputs["labels"].numel())
        elif model.training and "labels" in inputs:
            self.supervised_tokens += int((inputs["labels"][..., 1:] != -100).sum())
        elif model.training and "completion_mask" in inputs:  # DPO (chosen and rejected rows), KTO (each row)
            self.supervised_tokens += int(inputs["completion_mask"].sum())
        elif model.training and "chosen_labels" in inputs:  # ORPO: chosen and rejected labels, -100 elsewhere
            for key in ("chosen_labels", "rejected_labels"):
                self.supervised_tokens += int((inputs[key] != -100).sum())
        return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not torch.isfinite(loss).all():
            self.bad_loss_in_step = True
            return torch.zeros_like(loss)  # keep the logged running loss finite; the skip is logged apart
        return loss

    def previous_checkpoint(self, folder: Path) -> Path | None:
        return latest_valid_checkpoint(folder)

    def total_supervised_tokens(self) -> int:
        """Trained tokens of all processes together."""
        if self.accelerator.num_processes == 1:
            return self.supervised_tokens
        count = torch.tensor(self.supervised_tokens, device=self.accelerator.device)
        return int(self.accelerator.reduce(count, reduction="sum").item())

    def marker_fields(self) -> dict[str, Any]:
        return {
            "step": self.state.global_step,
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "supervised_tokens": self.supervised_tokens,
            "skipped_steps": self.skipped_steps,
            # The launch that wrote it: the data order and the sharded files depend on both.
            "processes": self.accelerator.num_processes,
            "sharding": "fsdp" if self.is_fsdp_enabled else ("deepspeed" if self.is_deepspeed_enabled else None),
        }

    def rotate_checkpoints(self) -> None:
        """Keep the newest ``keep_checkpoints`` complete checkpoints; drop older and broken ones."""
        root = Path(self.args.output_dir)
        newest_valid = latest_valid_checkpoint(root)
        if newest_valid is None:
            return
        complete = sorted(
            (p for p in root.iterdir() if step_of(p) >= 0 and (p / "checkpoint_complete.json").is_file()),
            key=step_of,
        )
        best = self.state.best_global_step  # the best eval loss so far is never rotated away
        for old in complete[: -self.keep_checkpoints]:
            if step_of(old) != best:
                shutil.rmtree(old, ignore_errors=True)
        for broken in (p for p in root.iterdir() if step_of(p) >= 0 and step_of(p) < step_of(newest_valid)):
            if not (broken / "checkpoint_complete.json").is_file():
                shutil.rmtree(broken, ignore_errors=True)


class PipeTrainer(TrainerInternals, RunGuarantees, SFTTrainer):
    """Supervised fine-tuning (method: sft)."""


def preference_trainer_class(method: str):
    """DPOTrainer, ORPOTrainer or KTOTrainer with the same guarantees; imported only for preference runs."""
    if method == "orpo":
        from qlora_pipe.compat.trl import orpo_trainer

        base = orpo_trainer()
    elif method == "kto":
        from trl import KTOTrainer as base
    else:
        from trl import DPOTrainer as base

    class PipePreferenceTrainer(TrainerInternals, RunGuarantees, base):
        pass

    return PipePreferenceTrainer


def classifier_trainer_class():
    """transformers' Trainer (task: classification: cross-entropy over the classes) with the same guarantees."""
    from transformers import Trainer

    class PipeClassifierTrainer(TrainerInternals, RunGuarantees, Trainer):
        pass

    return PipeClassifierTrainer
