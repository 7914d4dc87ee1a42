"""Peak host memory of a stage, with anonymous memory and memory-mapped files apart.

A process's peak resident size (VmHWM, ``ru_maxrss``) counts the pages of memory-mapped files: loading a
safetensors checkpoint maps the whole 16-bit file, so a 1.5B model's load peaks at 6.7 GiB resident of which
3.4 GiB are the file's pages, which the kernel can drop under pressure and which no other allocation has to
wait for. What a machine must hold is the anonymous part. Linux reports both only as current values
(RssAnon, RssFile in /proc/self/status), so a thread samples them; short spikes between two samples can be
missed, which the reported interval says. Elsewhere (no /proc) nothing is reported.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

STATUS = Path("/proc/self/status")
INTERVAL_S = 0.05
_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
_ACTIVE: list[HostMemory] = []  # the stages being measured, innermost last


def read_status() -> dict[str, int]:
    """Bytes of the fields above, or {} where /proc is not there."""
    try:
        lines = STATUS.read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in _FIELDS:
            found[key] = int(value.split()[0]) * 1024  # kB
    return found


class HostMemory:
    """``with HostMemory() as memory: ...`` then ``memory.report()``: the stage's peaks in bytes."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HostMemory:
        if not read_status():
            return self
        # "5" resets this process's VmHWM (Linux 4.0+): the stage's own peak, not an earlier stage's
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        self.sample()
        self._thread = threading.Thread(target=self._run, name="host-memory", daemon=True)
        self._thread.start()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        status = read_status()
        for key in self.peak:
            self.peak[key] = max(self.peak[key], status.get(key, 0))
        self.peak["VmRSS"] = max(self.peak["VmRSS"], status.get("VmHWM", 0))

    def report(self) -> dict[str, Any] | None:
        """Peak anonymous, peak memory-mapped-file and peak resident bytes (None where not measured)."""
        if self._thread is None:
            return None
        if self._thread.is_alive():
            self.sample()
        return {
            "peak_anonymous_bytes": self.peak["RssAnon"],
            "peak_file_mapped_bytes": self.peak["RssFile"],
            "peak_resident_bytes": self.peak["VmRSS"],
            "sampled_every_seconds": self.interval_s,
        }

    def line(self) -> str:
        report = self.report()
        if report is None:
            return "host memory: not measured here (no /proc)"
        gib = {key: value / 2**30 for key, value in report.items() if key.endswith("bytes")}
        return (
            f"host memory: peak {gib['peak_anonymous_bytes']:.2f} GiB anonymous, "
            f"{gib['peak_file_mapped_bytes']:.2f} GiB of memory-mapped files (the kernel can drop these), "
            f"{gib['peak_resident_bytes']:.2f} GiB resident in all"
        )


def current() -> HostMemory | None:
    """The innermost stage being measured in this process, if any."""
    return _ACTIVE[-1] if _ACTIVE else None


def host_available() -> tuple[int, str]:
    """Host memory this process may still use (MemAvailable, or the cgroup's memory.max if tighter), and where
    the figure comes from."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return 1 << 62, "not known here"
    fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
    available, source = int(fields["MemAvailable"].split()[0]) * 1024, "MemAvailable"
    limit, used = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    if limit.is_file() and used.is_file() and limit.read_text().strip() != "max":
        room = int(limit.read_text()) - int(used.read_text())
        if room < available:
            available, source = room, "the cgroup's memory.max"
    return available, source
