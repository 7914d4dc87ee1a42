"""A write of the export that failed for the disk's sake, as the one line a user reads."""

from __future__ import annotations

import shutil
from pathlib import Path

from qlora_pipe.errors import UserError
from qlora_pipe.machine.user_cache import disk_cause


def disk_refusal(exc: BaseException, partial: Path) -> UserError | None:
    """A write that failed for the disk's sake (full, quota, read-only) as one line; None for anything else."""
    cause = disk_cause(exc)
    if cause is None:
        return None
    try:
        free = f"; {shutil.disk_usage(partial.parent).free / 2**20:,.0f} MiB free now"
    except OSError:
        free = ""
    return UserError(
        f"export: cannot write the merged model into {partial.parent} ({cause}{free}); nothing half-written was "
        "kept (free some space or export elsewhere with --out)"
    )
