"""Crash-proof stages for a benchmark that may run only once: every result is on disk as soon as it exists.

A GPU is lent for minutes. The check therefore writes its JSON after every measurement (atomically: a kill
at any moment leaves the last complete file), gives each stage its own time limit and its own error
record, runs the riskiest stages last, can skip stages a previous run already measured (``--resume``),
and prints a one-screen summary at the end or when it is stopped by a signal.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class StageTimeout(Exception):
    """A stage ran past its own time limit; the next stage still runs."""


class Results:
    """The results file: a dict written atomically after every change."""

    def __init__(
        self, path: Path, header: dict[str, Any], resume: bool = False, budget: int | None = None, min_stage: int = 20
    ) -> None:
        self.path, self.min_stage = path, min_stage
        # The whole check's time: a stage gets at most what is left of it; one that would start with under
        # min_stage seconds left is recorded as not run (a second run with --resume measures it).
        self.deadline = time.time() + budget if budget else None
        previous = json.loads(path.read_text()) if resume and path.is_file() else {}
        self.data: dict[str, Any] = {**previous, **header, "errors": previous.get("errors", {})}
        self.data.setdefault("stage_seconds", {})
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(self.data, handle, indent=2, default=str)
            handle.write("\n")
        os.replace(tmp, self.path)

    def record(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.write()

    def done(self, stage: str) -> bool:
        return stage in self.data and stage not in self.data["errors"]

    def run(self, stage: str, work: Callable[[], Any], limit_seconds: int, faults: dict[str, str]) -> None:
        """Run one stage under its time limit; its value, or its error text, is recorded either way."""
        if self.done(stage):
            print(f"{stage}: measured by an earlier run, kept", flush=True)
            return
        started = time.time()
        if self.deadline is not None:
            left = int(self.deadline - started)
            if left < self.min_stage:
                self.data["errors"][stage] = "not run: the check's time budget was spent; rerun with --resume"
                print(f"{stage}: {self.data['errors'][stage]}", flush=True)
                self.data["stage_seconds"][stage] = 0.0
                self.write()
                return
            limit_seconds = min(limit_seconds, left)
        previous = signal.signal(signal.SIGALRM, _timeout(stage, limit_seconds))
        signal.alarm(limit_seconds)
        try:
            simulate(stage, faults)
            self.data[stage] = work()
            self.data["errors"].pop(stage, None)
        except Exception as exc:  # a stage's failure is a result too; the next stage runs
            self.data["errors"][stage] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
            print(f"{stage}: failed ({self.data['errors'][stage]})", flush=True)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        self.data["stage_seconds"][stage] = round(time.time() - started, 1)
        self.write()

    def summary(self) -> str:
        lines = [f"results: {self.path}"]
        for stage, seconds in self.data["stage_seconds"].items():
            error = self.data["errors"].get(stage)
            lines.append(f"  {stage:<20} {seconds:>7.1f} s  {'FAILED: ' + error if error else 'ok'}")
        return "\n".join(lines)


def _timeout(stage: str, limit: int):
    def handler(signum, frame):
        raise StageTimeout(f"{stage} ran past its limit of {limit} s")

    return handler


def simulate(stage: str, faults: dict[str, str]) -> None:
    """Dry-run faults, so the tests can prove the check survives them: crash, hang."""
    fault = faults.get(stage)
    if fault == "crash":
        raise RuntimeError(f"simulated crash in {stage}")
    if fault == "hang":
        time.sleep(3600)


def print_summary_on_signal(results: Results) -> None:
    """SIGTERM (a lease ending): say what was measured, then stop; the file is already complete."""

    def handler(signum, frame):
        print(results.summary(), flush=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
