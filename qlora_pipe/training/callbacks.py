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
