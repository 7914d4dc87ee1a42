"""TRL's SFTTrainer with the guarantees a long QLoRA run needs.

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

from qlora_pipe.checkpoints import latest_valid_checkpoint, step_of, write_marker
from qlora_pipe.errors import UserError

log = logging.getLogger(__name__)


class TrainingAborted(UserError):
    """Training stopped on purpose (too many bad steps); the last good checkpoint is intact."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written; the previous one is still valid."""


class SkippableScheduler:
    """Delegates to the real LR scheduler, except that a skipped update is not a scheduler step."""

    def __init__(self, inner: Any, trainer: PipeTrainer) -> None:
        self.inner = inner
        self.trainer = trainer

    def step(self, *args: Any, **kwargs: Any) -> None:
        if not self.trainer.skip_this_step:
            self.inner.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class BadStepGuard(TrainerCallback):
    """Decides, just before the optimizer step, whether this update is finite enough to apply."""

    def __init__(self, trainer: PipeTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        grads = [p.grad for p in trainer.model.parameters() if p.requires_grad and p.grad is not None]
        # One fused norm per tensor and a single host sync: a non-finite value makes its norm non-finite.
        finite_grads = not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
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


def keep_adapter_fp32_unless_bf16(model, bf16: bool) -> None:
    """Undo TRL's bf16 cast of a QLoRA adapter when the run does not train in bf16.

    TRL 1.16's SFTTrainer casts the trainable weights of every quantized model to bf16, whatever the
    precision. In an fp32 run on a CPU without native bf16 that makes every LoRA matmul an emulated
    bf16 one (about 30x slower); in an fp16 run the loss scaler needs fp32 master weights. So the
    adapter stays fp32 unless the run trains in bf16. The optimizer does not exist yet (it is created
    in train()), so nothing else holds the old tensors. Remove when TRL casts only for bf16 runs.
    """
    if bf16:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.bfloat16:
            param.data = param.data.float()


class PipeTrainer(SFTTrainer):
    def __init__(self, *args: Any, max_bad_steps: int = 5, keep_checkpoints: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """PEFT's load_adapter upcasts the reloaded adapter to fp32; put it back in its training dtype
        before the optimizer state is restored, so the resumed run computes exactly as the original."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, param in (model or self.model).named_parameters():
            dtype = self.adapter_dtypes.get(name)
            if dtype is not None and param.dtype != dtype:
                param.data = param.data.to(dtype)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs["skipped_steps"] = self.skipped_steps
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training and "labels" in inputs:
            self.supervised_tokens += int((inputs["labels"][..., 1:] != -100).sum())
        return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not torch.isfinite(loss).all():
            self.bad_loss_in_step = True
            return torch.zeros_like(loss)  # keep the logged running loss finite; the skip is logged apart
        return loss

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if not isinstance(scheduler, SkippableScheduler):
            self.lr_scheduler = SkippableScheduler(scheduler, self)
        return self.lr_scheduler

    def _save_checkpoint(self, model, trial):
        checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        previous = latest_valid_checkpoint(Path(self.args.output_dir))
        supervised = self.total_supervised_tokens()  # a collective: before any process-0-only branch
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                write_marker(checkpoint, {**self.marker_fields(), "supervised_tokens": supervised})
        except OSError as exc:
            shutil.rmtree(checkpoint, ignore_errors=True)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"could not write checkpoint {checkpoint}: {exc}; {kept}") from exc
        if self.args.should_save:
            self.rotate_checkpoints()

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
