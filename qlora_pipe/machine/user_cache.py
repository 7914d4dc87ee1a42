"""The user's cache folder (``$XDG_CACHE_HOME/qlora-pipe``, else ``~/.cache/qlora-pipe``): converted GGUF bases,
example models, llama.cpp's converter, and the sha256 of large files, each computed once.

A cache that cannot be written (a read-only file system, no permission, a file where a folder should be, a full
disk) is said in one line naming the folder and the cause. The hashes are kept only where that is sound: a
file's version is told by what a rewrite cannot keep. Its size and modification time can be set back
(``touch -r``, ``rsync -t``, an unpacked archive); its inode and status-change time (ctime) cannot: the kernel
sets ctime on every write and metadata change, and no system call sets it. A hash is kept only for a file whose
ctime was at least ``RACY_NS`` older than the read that hashed it, so that a change made after the hashing began
gets a later ctime even where timestamps are coarse (git's rule for a racily clean index).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from qlora_pipe.errors import UserError
from qlora_pipe.runs import file_sha256, write_json_atomic

log = logging.getLogger(__name__)

RACY_NS = 2_000_000_000
_KNOWN: dict[tuple, str] = {}  # this process's hashes, by file version
CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path above it is a file, not a folder",
}
FULL = (errno.ENOSPC, errno.EDQUOT)


def cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora-pipe"


def os_error_code(exc: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one a Rust library (safetensors) quotes as 'os error N'."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    found = re.search(r"os error (\d+)", str(exc))
    return int(found.group(1)) if found else None


def disk_cause(exc: BaseException) -> str | None:
    """Why a write failed, in words, when the cause is the disk or the folder (None for anything else)."""
    code = os_error_code(exc)
    return CAUSES.get(code) if code is not None else None


def cache_refusal(what: str, folder: Path, exc: BaseException, needed: int | None = None) -> UserError:
    """One line: what could not be done, the cache folder, the cause, and what to do."""
    cause = disk_cause(exc) or f"{type(exc).__name__}: {exc}"
    room = f"; it needs about {needed / 2**20:,.0f} MiB" if needed and os_error_code(exc) in FULL else ""
    hint = "free some space or set" if os_error_code(exc) in FULL else "set"
    return UserError(
        f"{what}: cannot write the cache folder {folder} ({cause}{room}); {hint} XDG_CACHE_HOME to a writable "
        "folder with room"
    )


def writable_folder(folder: Path, what: str) -> Path:
    """``folder``, created if needed and checked writable before long work (a download) is done for nothing."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise cache_refusal(what, folder, exc) from exc
    return folder


def sha256_of(path: Path) -> str:
    """The file's sha256, read once per file version (this process, then the cache's ``hashes/``)."""
    path = path.resolve()
    before = path.stat()
    key = (str(path), *_version(before))
    if key in _KNOWN:
        return _KNOWN[key]
    entry = _entry(path)
    stored = _read_json(entry)
    if stored.get("version") == list(key[1:]) and isinstance(stored.get("sha256"), str):
        _KNOWN[key] = stored["sha256"]
        return stored["sha256"]
    started = time.time_ns()
    digest = file_sha256(path)
    if _version(path.stat()) == key[1:] and before.st_ctime_ns < started - RACY_NS:
        _KNOWN[key] = digest
        _keep(entry, {"path": str(path), "version": list(key[1:]), "sha256": digest})
    return digest


def _version(stat: os.stat_result) -> tuple[int, ...]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _entry(path: Path) -> Path:
    return cache_home() / "hashes" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"


def _read_json(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _keep(entry: Path, payload: dict) -> None:
    """Best effort: a cache that cannot be written only means hashing again next time."""
    try:
        write_json_atomic(entry, payload)
    except OSError as exc:
        log.debug("file hash not kept in %s: %s", entry.parent, exc)


@contextlib.contextmanager
def locked(lock: Path, waiting: str) -> Iterator[None]:
    """Hold ``lock``, after whoever holds it now (saying ``waiting`` once). The kernel's lock (flock): a process
    killed while holding it never leaves it stuck."""
    import fcntl

    with lock.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning(waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
