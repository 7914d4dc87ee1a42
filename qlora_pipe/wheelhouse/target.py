"""The machine a wheelhouse is for: its Python, its platform tags, and what it already has installed."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from qlora_pipe.errors import UserError

# glibc 2.17 (manylinux2014) to 2.35 (Ubuntu 22.04, RHEL 9): what a current CUDA image runs. pip matches each
# --platform tag exactly, so every glibc in the range is named.
DEFAULT_PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)),
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
UNKNOWN = None  # installed, version not given: trusted to satisfy what needs it
_ITEM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*(?:(==|@)\s*(\S+))?\s*$")


@dataclass(frozen=True)
class Target:
    """Python ``python_version`` ('3.12') on ``platforms``; ``have`` maps canonical names to versions."""

    python_version: str = "3.12"
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS
    have: dict[str, Version | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"3\.\d{1,2}", self.python_version):
            raise UserError(f"--python-version: {self.python_version!r} is not MAJOR.MINOR (e.g. 3.12)")

    def markers(self, extra: str = "") -> dict[str, str]:
        """The environment that requirement markers are evaluated in (Linux x86-64, CPython)."""
        return {
            "python_version": self.python_version,
            "python_full_version": f"{self.python_version}.0",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "implementation_version": f"{self.python_version}.0",
            "sys_platform": "linux",
            "platform_system": "Linux",
            "platform_machine": "x86_64",
            "os_name": "posix",
            "platform_release": "",
            "platform_version": "",
            "extra": extra,
        }


def parse_have_item(item: str, where: str) -> tuple[str, Version | None]:
    """'torch==2.11.0' or 'numpy' (installed, version unknown) -> (canonical name, version or None)."""
    match = _ITEM.match(item.strip())
    if not match:
        raise UserError(f"{where}: {item.strip()!r} is not NAME==VERSION or NAME")
    name, operator, value = match.groups()
    if operator != "==":  # 'NAME @ URL' (pip freeze of a direct install) says nothing of the version
        return canonicalize_name(name), UNKNOWN
    try:
        return canonicalize_name(name), Version(value)
    except InvalidVersion:
        raise UserError(f"{where}: {value!r} is not a version (in {item.strip()!r})") from None


def read_have(items: list[str], files: list[Path]) -> dict[str, Version | None]:
    """What the target has: ``--have`` items, then ``pip freeze`` / ``pip list --format=freeze`` files."""
    have: dict[str, Version | None] = {}
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UserError(f"--have-file: cannot read {path}: {exc.strerror or exc}") from None
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if text and not text.startswith("-"):  # -e / --index-url lines install nothing by name
                name, version = parse_have_item(text, f"{path}:{number}")
                have[name] = version
    for item in items:
        name, version = parse_have_item(item, "--have")
        have[name] = version
    return have
