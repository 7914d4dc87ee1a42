"""Files damaged the way a user meets them."""

from __future__ import annotations

from pathlib import Path


def truncate(path: Path) -> None:
    """Cut the file in the middle of a record (as an interrupted copy or download leaves it)."""
    data = path.read_bytes()
    cut = len(data) // 2
    while data[cut - 1 : cut] in (b"\n", b"}"):
        cut -= 1
    path.write_bytes(data[:cut])
