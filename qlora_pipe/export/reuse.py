"""A verified merged folder is not made twice: ``export --format gguf`` after ``export`` reuses RUN/merged when
it was written from the same adapter with the same settings, passed its check, and every file is unchanged.

At 7B the merge and its verification take tens of minutes on a host CPU; re-doing them only to convert the
same weights to GGUF is waste. The export records each file's sha256 once it has its final name
(``export_info.json`` "files"); the reuse check hashes them again through the file-hash cache, which
reads a file only when its inode, size, times or ctime changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_pipe.machine import host_memory
from qlora_pipe.machine.user_cache import sha256_of
from qlora_pipe.runs import EXPORT_INFO, RunDir, write_json_atomic

FIDELITY = "fidelity.json"


def merged_files(out: Path) -> dict[str, dict[str, Any]]:
    """Every file of the merged folder but export_info.json: bytes and sha256 (kept in the hash cache)."""
    return {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(out.iterdir())
        if path.is_file() and path.name != EXPORT_INFO
    }


def record_merged(run: RunDir, out: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Add the adapter's and each file's hash to export_info.json, once the folder has its final name."""
    info = {**info, "adapter_sha256": sha256_of(run.adapter_weights), "files": merged_files(out)}
    memory = host_memory.current()
    if memory is not None:  # merge and verification: anonymous memory and memory-mapped files apart
        info["host_memory"] = memory.report()
        print(memory.line(), flush=True)
    write_json_atomic(out / EXPORT_INFO, info)
    return info


def reusable_export(
    run: RunDir, out: Path, merge_base: str, dtype_name: str, verify: bool
) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """(export_info, fidelity) of RUN/merged when it can be reused as it is; else None. Says which, and why."""
    if not out.is_dir():
        return None
    reason = why_not_reusable(run, out, merge_base, dtype_name, verify)
    if reason is not None:
        print(f"merged: made again ({out}: {reason})", flush=True)
        return None
    info, fidelity = load_export(out)
    state = "verified, " if fidelity and fidelity.get("passed") else ""
    print(f"merged: {out} reused ({state}same adapter and settings, every file unchanged)", flush=True)
    return info or {}, fidelity


def why_not_reusable(run: RunDir, out: Path, merge_base: str, dtype_name: str, verify: bool) -> str | None:
    """None when RUN/merged can be reused as it is; else the first reason it cannot."""
    info, fidelity = load_export(out)
    if not info or "files" not in info:
        return "no complete earlier export"
    if (info.get("merge_base"), info.get("dtype")) != (merge_base, dtype_name):
        return f"it was merged with {info.get('merge_base')} / {info.get('dtype')}"
    if verify and not (fidelity and fidelity.get("passed")):
        return "it was not verified"
    if info.get("adapter_sha256") != sha256_of(run.adapter_weights):
        return "the run's adapter changed since"
    present = {p.name for p in out.iterdir() if p.is_file() and p.name != EXPORT_INFO}
    if present != set(info["files"]):
        return "its files are not the ones it wrote"
    for name, recorded in info["files"].items():
        path = out / name
        if path.stat().st_size != recorded["bytes"] or sha256_of(path) != recorded["sha256"]:
            return f"{name} changed since it was written"
    return None


def load_export(out: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    def read(name: str) -> dict[str, Any] | None:
        try:
            loaded = json.loads((out / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return loaded if isinstance(loaded, dict) else None

    return read(EXPORT_INFO), read(FIDELITY)
