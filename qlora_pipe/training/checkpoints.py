"""Checkpoint integrity: a completion marker written last, verified before any resume.

The trainer writes ``checkpoint-N/`` file by file; only when everything is on disk do we add
``checkpoint_complete.json`` with the size and SHA-256 of every file. A directory without the
marker (crash or full disk mid-save) or whose files no longer match it (truncated, corrupted)
is never resumed from: it is skipped with a warning naming the reason.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from qlora_pipe.runs import file_sha256, write_json_atomic

log = logging.getLogger(__name__)

MARKER = "checkpoint_complete.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def write_marker(checkpoint: Path, extra: dict[str, Any]) -> None:
    files = {
        str(p.relative_to(checkpoint)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != MARKER and not p.name.startswith(".")
    }
    write_json_atomic(checkpoint / MARKER, {"files": files, **extra})


def read_marker(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / MARKER).read_text())


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it is complete and intact."""
    marker = checkpoint / MARKER
    if not marker.is_file():
        return "incomplete (no completion marker: the save was interrupted)"
    try:
        files = read_marker(checkpoint)["files"]
    except (OSError, ValueError, KeyError):
        return "unreadable completion marker"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != expected["bytes"]:
            return f"truncated file {name} ({path.stat().st_size} of {expected['bytes']} bytes)"
        if file_sha256(path) != expected["sha256"]:
            return f"corrupt file {name} (checksum mismatch)"
    return None


def step_of(checkpoint: Path) -> int:
    match = CHECKPOINT_RE.match(checkpoint.name)
    return int(match.group(1)) if match else -1


def latest_valid_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint that is complete and intact; broken newer ones are skipped with a warning."""
    if not checkpoints_dir.is_dir():
        return None
    candidates = sorted((p for p in checkpoints_dir.iterdir() if step_of(p) >= 0), key=step_of, reverse=True)
    for checkpoint in candidates:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        log.warning("skipping %s: %s", checkpoint, problem)
    return None
