"""Reaches into transformers. Verified with transformers 5.24.0 (5.x allowed by pyproject) under TRL 1.16.0.

TrainerInternals (a mixin before SFTTrainer)
    _load_from_checkpoint: PEFT's load_adapter upcasts the reloaded adapter to fp32; the mixin puts it
        back in its training dtype before the optimizer state is restored, so a resumed run computes
        exactly as the original. There is no public hook between the weights and the optimizer load.
        Caught by: tests/test_resume.py::test_crash_and_resume_reproduce_the_uninterrupted_run.
    _save_checkpoint: a write that fails (a full disk) removes the partial folder and says which
        checkpoint is still good. The completion marker itself is written by a public ``on_save``
        callback (training/trainer.py). Caught by: tests/test_resume.py::
        test_a_failed_save_is_a_clear_error_and_the_previous_checkpoint_stays.
    create_scheduler: wraps the LR scheduler so that an update skipped for a non-finite loss or
        gradient is not a scheduler step (Trainer steps the scheduler unconditionally). Caught by:
        tests/test_resume.py::test_a_non_finite_step_is_skipped_without_optimizer_or_scheduler_step.
    create_accelerator_and_postprocess: after the Trainer builds its Accelerator, an FSDP launch on a
        machine without a GPU is made FSDP again (compat/accelerate.py, verified with transformers 5.25.0:
        ``is_fsdp_enabled`` is read from the accelerator's state once, here). Caught by:
        tests/test_fsdp.py::test_two_process_fsdp_matches_one_process.
replace_progress_callbacks
    Trainer always adds its own progress bar and log printer; qlora-pipe shows one line instead.
tensorboard_callback
    TensorBoardCallback takes its folder from TrainingArguments.logging_dir, which transformers 5 no
    longer sets; the callback's ``logging_dir`` attribute puts the events in the run directory.
    Caught by: tests/test_train.py::test_training_lowers_loss_and_writes_a_complete_run (tensorboard/).
trackers_skip_missing_values
    TRL logs None for a metric with no value in the logged steps (a GRPO reward that applied to no row);
    the trackers' callbacks (TensorBoard, MLflow, ...) warn on every such log and drop the key. Their
    ``on_log`` gets the logs without the None values (metrics.jsonl keeps them as null). Caught by:
    tests/test_grpo_rewards.py::test_a_reward_that_applies_to_no_row_shows_n_a_and_training_goes_on.
gguf_bar_follows_switch
    transformers' GGUF loader (``modeling_gguf_pytorch_utils``, verified with transformers 5.25.0) draws its
    own tqdm bar ("Converting and de-quantizing GGUF tensors") and ignores transformers' progress-bar switch,
    which qlora-pipe turns off but for --debug: while a GGUF loads with the switch off, that module's ``tqdm``
    is a disabled one. Remove when the loader uses transformers' own tqdm. Caught by:
    tests/test_terminal.py::test_off_a_terminal_progress_is_plain_lines_and_library_bars_stay_out.
modules_kept_unquantized
    Which modules a 4-bit load leaves in 16-bit (lm_head, tied or output embeddings), from the
    quantizer's own helper, so the export quantizes exactly the weights training quantized.
    Caught by: tests/test_export.py (GPT-2 and Llama bases, tied and untied).
decoder_blocks
    The model class's ``_no_split_modules`` (the blocks accelerate never splits across devices, verified with
    transformers 5.25.0 and accelerate 1.16.0): the unit in which a merged model too large for this machine is
    verified, each block's weights read from its own safetensors files for its forward only (device_map value
    "disk"). Caught by:
    tests/test_verify_memory.py::test_a_merged_model_too_large_to_hold_is_verified_a_block_at_a_time.
tensors_loaded_as
    ``from_pretrained`` casts every checkpoint tensor to the load dtype as it reads it, but for the model's own
    ``_get_dtype_plan`` (name patterns to a dtype; verified with transformers 5.25.0, read by
    core_model_loading's loader). Adding exact names to that plan while a model loads reads those tensors in
    their stored 16-bit dtype: an fp32-compute load of a 7B never holds its input embedding in fp32, not even
    for a moment (models/embedding_storage.py). Caught by:
    tests/test_model.py::test_an_fp32_model_keeps_its_input_embedding_in_the_stored_bf16_exactly.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qlora_pipe.errors import CheckpointWriteError

VERIFIED = {"transformers": "5.24.0", "trl": "1.16.0"}


@contextmanager
def tensors_loaded_as(dtypes: dict[str, Any]) -> Iterator[None]:
    """Inside: ``from_pretrained`` reads the named parameters (exact names) in the given dtypes."""
    from transformers import PreTrainedModel

    if not dtypes:
        yield
        return
    original = PreTrainedModel._get_dtype_plan

    def plan(self, dtype):
        return {**original(self, dtype), **{f"^{re.escape(name)}$": wanted for name, wanted in dtypes.items()}}

    PreTrainedModel._get_dtype_plan = plan
    try:
        yield
    finally:
        PreTrainedModel._get_dtype_plan = original


class SkippableScheduler:
    """Delegates to the real LR scheduler, except that a skipped update is not a scheduler step."""

    def __init__(self, inner: Any, trainer: Any) -> None:
        self.inner = inner
        self.trainer = trainer

    def step(self, *args: Any, **kwargs: Any) -> None:
        if not self.trainer.skip_this_step:
            self.inner.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class TrainerInternals:
    """Overrides of Trainer's private checkpoint hooks and its scheduler factory (see the module docstring).

    The trainer using it provides ``adapter_dtypes`` (parameter name -> training dtype) and
    ``skip_this_step`` (set by the bad-step guard before the optimizer step).
    """

    adapter_dtypes: dict[str, Any]
    skip_this_step: bool

    def create_accelerator_and_postprocess(self) -> None:
        from qlora_pipe.compat.accelerate import fsdp_on_cpu, quiet_sharded_save_messages

        super().create_accelerator_and_postprocess()
        if fsdp_on_cpu(self.accelerator):
            self.is_fsdp_enabled = True
        if self.is_fsdp_enabled:
            quiet_sharded_save_messages()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, param in (model or self.model).named_parameters():
            dtype = self.adapter_dtypes.get(name)
            if dtype is not None and param.dtype != dtype:
                param.data = param.data.to(dtype)

    def _save_checkpoint(self, model, trial):
        checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except OSError as exc:
            shutil.rmtree(checkpoint, ignore_errors=True)
            # The newest complete checkpoint, from the trainer that knows the markers (training/trainer.py).
            previous = getattr(self, "previous_checkpoint", lambda folder: None)(checkpoint.parent)
            raise checkpoint_write_error(checkpoint, exc, previous) from exc

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if not isinstance(scheduler, SkippableScheduler):
            self.lr_scheduler = SkippableScheduler(scheduler, self)
        return self.lr_scheduler


def checkpoint_write_error(checkpoint: Path, exc: OSError, previous: Path | None) -> CheckpointWriteError:
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return CheckpointWriteError(f"could not write checkpoint {checkpoint}: {exc}; {kept}")


def replace_progress_callbacks(trainer: Any, progress: Any) -> None:
    """Trainer's own tqdm bar and printed log dicts out, our one-line progress in."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress)


def tensorboard_callback(logging_dir: Path) -> Any:
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(logging_dir)
    return callback


def trackers_skip_missing_values(trainer: Any) -> None:
    """Each tracker callback (transformers.integrations) sees a log without its None values."""
    for callback in trainer.callback_handler.callbacks:
        if not type(callback).__module__.startswith("transformers.integrations"):
            continue
        on_log = callback.on_log

        def present_only(args, state, control, logs=None, _on_log=on_log, **kwargs):
            logs = {k: v for k, v in logs.items() if v is not None} if logs else logs
            return _on_log(args, state, control, logs=logs, **kwargs)

        callback.on_log = present_only


@contextmanager
def gguf_bar_follows_switch() -> Iterator[None]:
    """Within the block, transformers' GGUF loader draws its bar only if transformers' bars are on."""
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils.logging import is_progress_bar_enabled

    drawn = getattr(gguf_loading, "tqdm", None)
    if drawn is None or is_progress_bar_enabled():
        yield
        return
    gguf_loading.tqdm = partial(drawn, disable=True)
    try:
        yield
    finally:
        gguf_loading.tqdm = drawn


def modules_kept_unquantized(skeleton: Any) -> set[str]:
    from transformers.quantizers.base import get_keys_to_not_convert

    return set(get_keys_to_not_convert(skeleton))


def decoder_blocks(skeleton: Any) -> list[str]:
    """The outermost modules of ``skeleton`` (a model on the meta device) that accelerate keeps whole."""
    kinds = set(getattr(skeleton, "_no_split_modules", None) or [])
    found: list[str] = []
    for name, module in skeleton.named_modules():
        if type(module).__name__ in kinds and not any(name.startswith(block + ".") for block in found):
            found.append(name)
    return found
