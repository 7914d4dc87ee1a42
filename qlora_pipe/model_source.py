"""Where a model comes from: a local directory or a Hugging Face Hub id. One rule, used by loading,
planning, export and model cards alike."""

from __future__ import annotations

from pathlib import Path

from qlora_pipe.errors import UserError


def is_local(name: str) -> bool:
    """A path (./x, /x, ~/x, a/b/c) or anything that exists on disk; otherwise a Hub id like org/name."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def local_path(name: str) -> Path | None:
    """The expanded local path of ``name``, or None for a Hub id."""
    return Path(name).expanduser() if is_local(name) else None


def check_local_dir(name: str, key: str = "model.name_or_path") -> None:
    """Fail before any download when a name that is a local path is not a directory."""
    path = local_path(name)
    if path is not None and not path.is_dir():
        raise UserError(f"{key}: directory not found: {name}")
