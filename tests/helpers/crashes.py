"""A run stopped as a crash would stop it, at a chosen step, and its logged losses to compare with a run that
was never stopped (exact resume: the same losses, step for step)."""

from __future__ import annotations

import json

from transformers import TrainerCallback

from qlora_pipe.runs import RunDir


class SimulatedCrash(BaseException):
    """Stands for the process dying (power loss, OOM kill) at a chosen point."""


class CrashAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SimulatedCrash


def losses(run: RunDir) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]
