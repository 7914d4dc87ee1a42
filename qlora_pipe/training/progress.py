"""The training progress bar: step, loss, learning rate, trained tokens/s, ETA and peak memory (plain lines
at an interval when the output is not a terminal: qlora_pipe/terminal.py)."""

from __future__ import annotations

import resource
import time

import torch
from transformers import TrainerCallback

from qlora_pipe.terminal import progress_bar


def peak_memory_bytes() -> int:
    """Peak accelerator memory on a GPU; the process's peak resident memory otherwise."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


class RunProgress(TrainerCallback):
    """Replaces the trainer's bar (and its printed log dicts) with one line that says what matters."""

    def __init__(self, trainer, label: str = "") -> None:
        self.trainer = trainer
        self.label = label  # how the run computes, e.g. "fp32, 2 threads"
        self.bar = None
        self.started = 0.0
        self.tokens_at_start = 0
        self.last: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = progress_bar(  # a bar on a terminal, plain lines in a log file
                total=state.max_steps,
                initial=state.global_step,
                desc=f"training ({self.label})" if self.label else "training",
                unit="step",
            )
            self.started = time.time()
            self.tokens_at_start = self.trainer.supervised_tokens

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        elapsed = max(time.time() - self.started, 1e-9)
        tokens = self.trainer.supervised_tokens - self.tokens_at_start
        self.last["tok/s"] = f"{tokens / elapsed:,.0f}"
        self.last["peak"] = f"{peak_memory_bytes() / 2**30:.2f}GiB"
        self.bar.set_postfix(self.last, refresh=False)
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.last["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            self.last["lr"] = f"{logs['learning_rate']:.2e}"
        self.last.update(grpo_fields(logs))
        if "eval_loss" in logs:
            self.last["eval"] = f"{logs['eval_loss']:.4f}"
            self.bar.write(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")
        self.bar.set_postfix(self.last)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def grpo_fields(logs: dict[str, float | None]) -> dict[str, str]:
    """GRPO's numbers for the progress line: each reward's mean and spread, the weighted reward, mean
    completion length, share of completions cut at max_completion_length, and KL to the reference. A reward
    that applied to no row of the logged steps (it returned None for each, as TRL allows) shows n/a."""
    fields = {}
    for key, value in logs.items():
        if key.startswith("rewards/") and key.endswith("/mean"):
            name = key[len("rewards/") : -len("/mean")]
            spread = logs.get(f"rewards/{name}/std")
            fields[name] = "n/a" if value is None else f"{value:.2f}±{_shown(spread, '{:.2f}')}"
    shown = (("reward", "reward", "{:.3f}"), ("completions/mean_length", "len", "{:.1f}"))
    shown += (("completions/clipped_ratio", "trunc", "{:.0%}"), ("kl", "kl", "{:.4f}"))
    fields.update({label: _shown(logs[key], fmt) for key, label, fmt in shown if key in logs})
    return fields


def _shown(value: float | None, fmt: str) -> str:
    """TRL logs None for a metric with no value in the logged steps (every row's reward None)."""
    return "n/a" if value is None else fmt.format(value)
