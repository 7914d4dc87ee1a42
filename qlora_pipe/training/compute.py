"""How a run computes: precision resolved from auto for this hardware, CPU threads, and the device record."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from qlora_pipe.machine.cpu_threads import ThreadChoice, apply_cpu_threads
from qlora_pipe.machine.dist import is_main_process
from qlora_pipe.machine.hardware import (
    PrecisionChoice,
    cpu_flags,
    detect_hardware,
    isa_summary,
    resolve_recipe_precision,
)
from qlora_pipe.models.loading import training_device
from qlora_pipe.recipe import Recipe

log = logging.getLogger(__name__)


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
