"""How many CPU threads a run computes with, and whether idle OpenMP threads spin or sleep.

Threads follow the CPUs this process may use (affinity mask, cgroup quota), shared among the processes
of one launch; QLORA_PIPE_CPU_THREADS, training.cpu_threads or OMP_NUM_THREADS override that.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

THREADS_ENV = "QLORA_PIPE_CPU_THREADS"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota (v2 cpu.max or v1 cfs_quota), or None when unlimited."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = [*v2.read_text().split(), "100000"][:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file, period_file = root / "cpu/cpu.cfs_quota_us", root / "cpu/cpu.cfs_period_us"
        if quota_file.is_file() and period_file.is_file():
            quota_us = int(quota_file.read_text())
            return None if quota_us <= 0 else quota_us / int(period_file.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cpus() -> tuple[int, str]:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    if limit is not None and math.ceil(limit) < affinity:
        return max(1, math.ceil(limit)), f"cgroup quota of {limit:g} CPUs"
    return affinity, f"{affinity} CPUs in this process's affinity"


def choose_cpu_threads(setting: int | str = "auto", environ: dict[str, str] | None = None) -> ThreadChoice:
    """Threads for CPU compute: QLORA_PIPE_CPU_THREADS, else the recipe's number, else the CPUs available."""
    environ = os.environ if environ is None else environ
    value = environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            from qlora_pipe.errors import UserError

            raise UserError(f"{THREADS_ENV}={value!r}: expected a positive whole number of threads")
        return ThreadChoice(int(value), f"{THREADS_ENV}={value}")
    if setting != "auto":
        return ThreadChoice(int(setting), "training.cpu_threads in the recipe")
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return ThreadChoice(int(omp), f"OMP_NUM_THREADS={omp}")
    count, why = available_cpus()
    # Processes of one launch (torchrun sets LOCAL_WORLD_SIZE) share the CPUs instead of each taking all.
    local = environ.get("LOCAL_WORLD_SIZE", "1")
    share = int(local) if local.isdigit() and int(local) > 1 else 1
    if share > 1:
        return ThreadChoice(max(1, count // share), f"{why}, shared by {share} processes")
    return ThreadChoice(count, why)


def busy_cpus_elsewhere(sample_seconds: float = 0.2) -> float:
    """CPUs kept busy by other processes right now (sampled from /proc/stat while this one sleeps)."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return 0.0

    def read() -> tuple[int, int]:
        fields = [int(x) for x in stat.read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    total0, idle0 = read()
    time.sleep(sample_seconds)
    total1, idle1 = read()
    elapsed = total1 - total0
    if elapsed <= 0:
        return 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / elapsed)


def set_passive_wait_if_busy() -> bool:
    """Before torch loads: let idle OpenMP threads sleep instead of spinning when other work shares the CPUs.

    Measured on a 2-core machine with one other busy process, a loop of small matmuls took 8.8 s with
    spinning threads and 2.1 s with OMP_WAIT_POLICY=PASSIVE; on a quiet machine passive waiting cost
    25% (1.0 s vs 1.3 s), so it is chosen only when the CPUs are busy. A user's own setting is kept.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return False
    if busy_cpus_elsewhere() < 0.5:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def apply_cpu_threads(setting: int | str = "auto") -> ThreadChoice:
    """Set torch's intra-op threads for a CPU run and say why (shown in the progress line)."""
    import torch

    choice = choose_cpu_threads(setting)
    torch.set_num_threads(choice.threads)
    return choice


# Commands that compute on the CPU when there is no GPU: their OpenMP threads are set up before torch loads.
COMPUTING = ("train", "export", "eval", "chat", "build-quickstart-model")


def set_up_cpu(command: str) -> None:
    """Passive OpenMP waiting when other work shares the CPUs (must precede torch's import); threads from
    the CPUs this process may use. Training applies its own setting (training.cpu_threads) again."""
    if command not in COMPUTING:
        return
    passive = set_passive_wait_if_busy()
    choice = apply_cpu_threads()
    log.debug("CPU threads %d (%s), passive wait %s", choice.threads, choice.reason, passive)
