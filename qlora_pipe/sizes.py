"""One grammar for sizes in bytes, wherever a user writes one: 24GiB, 80 GB, 5GB, 500MB, 1.5GiB, or a
plain number of bytes. Decimal units are powers of 1000, binary ones (KiB, MiB, ...) powers of 1024."""

from __future__ import annotations

import re

from qlora_pipe.errors import UserError

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", flags=re.IGNORECASE)


def parse_size(text: str, where: str = "size") -> int:
    """'24GiB' -> 25769803776; a UserError naming ``where`` (the flag or recipe key) otherwise."""
    match = SIZE.fullmatch(str(text))
    unit = (match.group(2) or "B").upper() if match else ""
    if not match or unit not in UNITS:
        raise UserError(f"{where}: {text!r} is not a size (e.g. 24GiB, 5GB, 500MB)")
    return int(float(match.group(1)) * UNITS[unit])
