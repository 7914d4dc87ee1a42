"""Trainer callbacks of a run: metrics.jsonl, and pushing each completed checkpoint to the Hub."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from qlora_pipe.runs import RunDir


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


class HeldOutBeforeAfter(TrainerCallback):
    """Held-out scores (``measure(model)``) before training, kept by a resumed run, and after it, in ``path``.
    Sharded (FSDP, ZeRO-3), each pass is a collective: every process measures, in step; the first records."""

    def __init__(self, path: Path, measure) -> None:
        self.path, self.measure = path, measure

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from qlora_pipe.machine.dist import is_main_process
        from qlora_pipe.runs import write_json_atomic
        from qlora_pipe.training.sharded import runs_model_passes

        if state.global_step == 0 and runs_model_passes(model):  # a resumed run keeps its "before"
            before = self.measure(model)
            if is_main_process():
                write_json_atomic(self.path, {"before": before})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from qlora_pipe.machine.dist import is_main_process
        from qlora_pipe.runs import write_json_atomic
        from qlora_pipe.training.sharded import is_sharded

        recording = is_main_process() and self.path.is_file()
        if recording or is_sharded(model):
            after = self.measure(model)
            if recording:
                write_json_atomic(self.path, {**json.loads(self.path.read_text()), "after": after})
