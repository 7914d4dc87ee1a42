"""The run directory: every path and file name of a run lives here.

A run is finished only when ``summary.json`` exists; it is written last, atomically. A run
directory without it (crash, Ctrl-C, error) is never mistaken for a finished one: export, chat
and eval (through ``resolve_run``), push and ``latest_finished_run`` all refuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError

log = logging.getLogger(__name__)

_HELD: set[Path] = set()  # run-directory locks this process holds (RunDir.exclusive)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RESOLVED_RECIPE = "recipe.resolved.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
STATUS = "status.json"
PREVIEW = "preview.json"
DATA_REPORT = "data_report.json"
LOSS_CURVE = "loss.png"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
EVAL_REPORT = "eval.json"
DATA_FINGERPRINT = "data_fingerprint.json"  # the training data's fingerprint when the run started (resume checks)
BASE_RECORD = "base.json"  # the base model the run trained on (later stages check it: base_record.py)
SYSTEM_PROMPT = "system_prompt.json"  # the system message the training data used (chat, eval, export)
EXPORT_INFO = "export_info.json"  # written into a merged folder: which run it came from
RUN_MARKER = ".qlora-pipe-run"  # written when a run directory is created: the proof it is ours to replace


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def adapter_weights(self) -> Path:
        return self.root / ADAPTER_WEIGHTS

    @property
    def adapter_config(self) -> Path:
        return self.root / ADAPTER_CONFIG

    @property
    def resolved_recipe(self) -> Path:
        return self.root / RESOLVED_RECIPE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def status(self) -> Path:
        return self.root / STATUS

    @property
    def preview(self) -> Path:
        return self.root / PREVIEW

    @property
    def data_report(self) -> Path:
        return self.root / DATA_REPORT

    @property
    def system_prompt(self) -> Path:
        return self.root / SYSTEM_PROMPT

    @property
    def data_fingerprint(self) -> Path:
        return self.root / DATA_FINGERPRINT

    @property
    def base_record(self) -> Path:
        return self.root / BASE_RECORD

    @property
    def lock(self) -> Path:
        """Beside the directory, not in it: --overwrite can replace the directory while the lock is held."""
        return self.root.parent / f".{self.root.name}.lock"

    @property
    def loss_curve(self) -> Path:
        return self.root / LOSS_CURVE

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def eval_report(self) -> Path:
        return self.root / EVAL_REPORT

    def is_finished(self) -> bool:
        return self.summary.is_file() and self.adapter_weights.is_file()

    def check_available(self, overwrite: bool) -> None:
        """Refuse to clobber an existing run unless asked; no side effects."""
        if self.root.is_file():
            raise UserError(f"{self.root} is a file, not a run directory")
        if not (self.root.exists() and any(self.root.iterdir())):
            return
        if not self.is_run_directory():
            raise UserError(
                f"{self.root} exists and is not a qlora-pipe run directory; --overwrite replaces only run "
                "directories: choose another run_name (--set run_name=NAME) or output_dir"
            )
        if not overwrite:
            state = "a finished run" if self.is_finished() else f"an unfinished run (status: {self.state()})"
            raise UserError(
                f"{self.root} already holds {state}; choose another run_name (--set run_name=NAME) or pass --overwrite"
            )

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold this run directory for one training process: a second one is refused at once."""
        busy = f"{self.root} is in use by another training ({{owner}}); wait for it to end or choose another run_name"
        with held(self.lock, busy + " (--set run_name=NAME)"):
            yield

    @contextlib.contextmanager
    def exporting(self) -> Iterator[None]:
        """One export of this run at a time: two would write the same merged folder and GGUF files, each
        deleting the other's partial output. A second export is refused at once, naming the first."""
        busy = f"{self.root} is being exported by another process ({{owner}}); wait for it to end"
        with held(self.root.parent / f".{self.root.name}.export.lock", busy):
            yield

    def is_run_directory(self) -> bool:
        """Made by qlora-pipe: its marker, or (runs from before the marker) its resolved recipe or status."""
        return any((self.root / name).is_file() for name in (RUN_MARKER, RESOLVED_RECIPE, STATUS))

    def prepare(self, overwrite: bool) -> None:
        """Create an empty run directory (replacing an old run only when ``overwrite``)."""
        self.check_available(overwrite)
        if self.root.exists():
            shutil.rmtree(self.root)  # empty, or a run directory (checked above)
        self.root.mkdir(parents=True)
        (self.root / RUN_MARKER).write_text("created by qlora-pipe train\n")

    def set_status(self, state: str, **extra: Any) -> None:
        write_json_atomic(self.status, {"state": state, "pid": os.getpid(), **extra})

    def record_outcome(self, state: str, **extra: Any) -> None:
        """Record how a run ended, best effort: on a full disk this write fails too, and that must not
        replace the error that ended the run. A status left at 'running' is read as ended (state())."""
        try:
            self.set_status(state, **extra)
        except OSError as exc:
            log.warning("could not record status %r in %s: %s", state, self.status, exc)

    def state(self) -> str:
        """The recorded state; 'running' only while a process still holds the run (its lock)."""
        if not self.status.is_file():
            return "unknown"
        try:
            state = json.loads(self.status.read_text()).get("state", "unknown")
        except (OSError, ValueError):
            return "unknown"
        if state == "running" and not self.held_by_another_process():
            return "ended without recording why (killed, or its status could not be written)"
        return state

    def held_by_another_process(self) -> bool:
        if self.lock in _HELD:
            return False  # this process holds it: no other one can
        try:
            with self.exclusive():
                return False
        except UserError:
            return True


@contextlib.contextmanager
def held(lock_path: Path, busy: str) -> Iterator[None]:
    """Hold ``lock_path`` for this process, or refuse with ``busy`` (its ``{owner}``: the holder's pid).
    The lock is the kernel's (flock), so a crashed or killed process never leaves it stuck."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise UserError(busy.replace("{owner}", handle.read().strip() or "another process")) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        _HELD.add(lock_path)
        try:
            yield
        finally:
            _HELD.discard(lock_path)
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def latest_finished_run(output_dir: str | Path = "runs") -> RunDir:
    """The most recently finished run under ``output_dir`` (by summary.json mtime)."""
    root = Path(output_dir)
    runs = [RunDir(p) for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    finished = [r for r in runs if r.is_finished()]
    if not finished:
        raise UserError(f"no finished run under {root}/ (a run is finished when it has {SUMMARY})")
    return max(finished, key=lambda r: r.summary.stat().st_mtime)


def resolve_run(run_dir: str | Path | None, output_dir: str = "runs") -> RunDir:
    """The given run directory, which must be finished, or the most recently finished one under output_dir."""
    if run_dir is None:
        run = latest_finished_run(output_dir)
        log.info("using the most recently finished run: %s", run.root)
        return run
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise UserError(f"run directory not found: {run.root}")
    if not run.summary.is_file():  # a missing adapter is reported by the stage that needs it, by name
        raise UserError(f"{run.root} is not a finished run (no summary.json); finish or resume training first")
    return run


def run_of_merged(merged: Path) -> RunDir | None:
    """The run an exported model came from: export_info.json names it; export writes into RUN_DIR/merged."""
    info_path = merged / EXPORT_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    candidates = ([Path(info["run"])] if info.get("run") else []) + [merged.parent]
    return next((RunDir(c) for c in candidates if (c / RESOLVED_RECIPE).is_file()), None)


def training_system_prompt(run: RunDir | None) -> str | None:
    """The system message the run's training data used, as recorded at training time (None if none)."""
    if run is None or not run.system_prompt.is_file():
        return None
    return json.loads(run.system_prompt.read_text()).get("system_prompt")
