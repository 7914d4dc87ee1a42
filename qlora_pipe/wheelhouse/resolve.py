"""The wheels a target lacks, resolved by hand from the project's own ranges: one version per package.

pip cannot resolve for another machine's installed set (``--target`` installs ignore what is there), so each
requirement is checked here against what the target has; only what is missing or outside the range is
downloaded, with ``pip download --no-deps`` for the target's Python and platform, and the downloaded
wheel's own requirements are followed in turn. Packages the target has are trusted with their own
dependencies. A version the constraints file pins (the tested set) is preferred where it fits the range.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import HeaderParser
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from qlora_pipe.errors import UserError
from qlora_pipe.wheelhouse.target import Target

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
PURPOSES = {"gpu-check": (), "pipeline": ("gguf",)}  # the whole pipeline: GGUF export too
MANIFEST = "wheelhouse.json"
_EXTRA = re.compile(r'extra == "([^"]+)"')


@dataclass
class Wheel:
    """One wheel of the house: what it is, why the target needs it, and who asked for it."""

    name: str
    version: Version
    path: Path
    reason: str
    wanted_by: list[str] = field(default_factory=list)
    extras: set[str] = field(default_factory=set)

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass
class Resolution:
    wheels: dict[str, Wheel] = field(default_factory=dict)
    assumed: set[str] = field(default_factory=set)  # the target has them, version not given
    satisfied: dict[str, str] = field(default_factory=dict)  # name -> the target's version, in range


def project_requirements(purpose: str, extras: tuple[str, ...] = ()) -> list[Requirement]:
    """qlora-pipe's own requirements for ``purpose`` (gpu-check: the core; pipeline: with the gguf extra)."""
    if purpose not in PURPOSES:
        raise UserError(f"--for: {purpose!r} is not one of {', '.join(PURPOSES)}")
    try:
        lines = metadata.requires("qlora-pipe") or []
    except metadata.PackageNotFoundError:  # a clone on PYTHONPATH, not installed: read pyproject.toml
        lines = _pyproject_requirements()
    wanted, declared, chosen = set(PURPOSES[purpose]) | set(extras), set(), []
    for line in lines:
        requirement = Requirement(line)
        found = _EXTRA.search(str(requirement.marker or ""))
        declared.add(found.group(1) if found else "")
        if found is None or found.group(1) in wanted:
            requirement.marker = None if found else requirement.marker  # other markers: the target's, later
            chosen.append(requirement)
    if unknown := sorted(wanted - declared):
        raise UserError(f"--extra: {', '.join(unknown)} is not an extra of qlora-pipe")
    return chosen


def _pyproject_requirements() -> list[str]:
    import tomllib  # Python 3.11+; an installed qlora-pipe (the usual case) never gets here

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra, requirements in project.get("optional-dependencies", {}).items():
        lines += [f'{line}; extra == "{extra}"' for line in requirements]
    return lines


def pinned_versions(path: Path = CONSTRAINTS) -> dict[str, Version]:
    """The tested versions (constraints.txt): preferred where they fit the ranges."""
    pins = {}
    for line in path.read_text().splitlines():
        name, _, version = line.split("#", 1)[0].partition("==")
        if version.strip():
            pins[canonicalize_name(name.strip())] = Version(version.strip())
    return pins


def wheel_requirements(path: Path) -> list[Requirement]:
    """Requires-Dist of a wheel, read from its METADATA."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        headers = HeaderParser().parsestr(archive.read(name).decode("utf-8"))
    requirements = []
    for line in headers.get_all("Requires-Dist") or []:
        try:
            requirements.append(Requirement(line))
        except InvalidRequirement:
            raise UserError(f"{path.name}: cannot read its requirement {line!r}") from None
    return requirements


def download(
    name: str, spec: SpecifierSet, pin: Version | None, target: Target, dest: Path, sources: tuple[str, ...] = ()
) -> Path:
    """One wheel for the target, newest in ``spec`` (the pin if it fits and exists), by pip; its path in ``dest``."""
    tries = [f"{name}=={pin}"] if pin is not None and spec.contains(pin, prereleases=True) else []
    said = ""
    for wanted in [*tries, f"{name}{spec}"]:
        with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
            command += ["--python-version", target.python_version, "--implementation", "cp", "--dest", tmp, *sources]
            for platform in target.platforms:
                command += ["--platform", platform]
            done = subprocess.run([*command, wanted], capture_output=True, text=True, env=_pip_env())
            files = list(Path(tmp).glob("*.whl"))
            if done.returncode == 0 and len(files) == 1:
                final = dest / files[0].name
                os.replace(files[0], final)
                return final
            said = " ".join((done.stderr or done.stdout).split())[-300:]
    raise UserError(f"no wheel of {name}{spec} for Python {target.python_version} on {target.platforms[0]}...: {said}")


def _pip_env() -> dict[str, str]:
    # A constraints file of this machine's (PIP_CONSTRAINT, pip.conf) is about this machine, not the target's.
    return {**os.environ, "PIP_CONSTRAINT": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _existing(dest: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(dest.glob("*.whl")):
        name = canonicalize_name(parse_wheel_filename(path.name)[0])
        if name in found:
            raise UserError(f"{dest} holds two wheels of {name} ({found[name].name}, {path.name}): keep one")
        found[name] = path
    return found


class Resolver:
    """Breadth first from the project's requirements; the first range seen for a package is never widened."""

    def __init__(
        self, target: Target, dest: Path, pins: dict[str, Version], log: Callable[[str], None], sources: tuple[str, ...]
    ) -> None:
        self.target, self.dest, self.pins, self.log, self.sources = target, dest, pins, log, sources
        self.specs: dict[str, SpecifierSet] = {}
        self.result = Resolution()
        self.existing = _existing(dest)
        self.queue: deque[tuple[Requirement, str, str]] = deque()

    def run(self, requirements: list[Requirement]) -> Resolution:
        self.queue.extend((r, "qlora-pipe", "") for r in requirements)
        while self.queue:
            self.visit(*self.queue.popleft())
        if stray := sorted(set(self.existing) - set(self.result.wheels)):
            raise UserError(
                f"{self.dest} holds wheels this set does not need ({', '.join(stray)}): `pip install "
                f"{self.dest}/*.whl` would install them too; remove them or use an empty folder"
            )
        return self.result

    def visit(self, requirement: Requirement, parent: str, extra: str) -> None:
        if requirement.marker is not None and not requirement.marker.evaluate(self.target.markers(extra)):
            return
        name = canonicalize_name(requirement.name)
        spec = self.specs[name] = self.specs.get(name, SpecifierSet()) & requirement.specifier
        if name in self.result.wheels:
            self.check_chosen(self.result.wheels[name], spec, parent, requirement.extras)
            return
        have = self.target.have.get(name, ...)
        if have is None:
            self.result.assumed.add(name)
            return
        if have is not ... and spec.contains(have, prereleases=True):
            self.result.satisfied[name] = str(have)
            return
        reason = "missing" if have is ... else f"has {have}, needs {spec}"
        self.add(name, spec, reason, parent, requirement.extras)

    def check_chosen(self, wheel: Wheel, spec: SpecifierSet, parent: str, extras: set[str]) -> None:
        if not spec.contains(wheel.version, prereleases=True):
            raise UserError(
                f"two versions of {wheel.name} would be needed: {wheel.version} (for {', '.join(wheel.wanted_by)}) "
                f"and {parent}'s {spec}"
            )
        wheel.wanted_by.append(parent)
        self.follow(wheel, set(extras) - wheel.extras)

    def add(self, name: str, spec: SpecifierSet, reason: str, parent: str, extras: set[str]) -> None:
        pin = self.pins.get(name)
        have = self.existing.get(name)
        if have is not None and spec.contains(parse_wheel_filename(have.name)[1], prereleases=True):
            path = have  # downloaded by an earlier run into this folder
        elif have is not None:
            raise UserError(f"{self.dest} holds {have.name}, but {parent} needs {name}{spec}: remove it")
        else:
            path = download(name, spec, pin, self.target, self.dest, self.sources)
        wheel = Wheel(name, parse_wheel_filename(path.name)[1], path, reason, [parent])
        self.result.satisfied.pop(name, None)  # a later, narrower range than the target's version
        self.result.wheels[name] = wheel
        self.log(f"  {path.name}  {wheel.size / 2**20:.2f} MiB  ({reason})")
        self.follow(wheel, {""} | set(extras))

    def follow(self, wheel: Wheel, extras: set[str]) -> None:
        requirements = wheel_requirements(wheel.path)
        for extra in sorted(extras):
            wheel.extras.add(extra)
            for requirement in requirements:
                self.queue.append((requirement, wheel.name, extra))


def build_wheelhouse(
    dest: Path,
    target: Target,
    requirements: list[Requirement],
    log: Callable[[str], None] = print,
    sources: tuple[str, ...] = (),
    pins: dict[str, Version] | None = None,
) -> Resolution:
    """Download what ``target`` lacks of ``requirements`` into ``dest``; ``dest/wheelhouse.json`` records it.

    ``sources``: pip's index options (``--no-index``, ``--find-links DIR``); ``pins``: preferred versions
    (default: the tested set in constraints.txt)."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {dest}: {exc.strerror or exc}") from None
    result = Resolver(target, dest, pinned_versions() if pins is None else pins, log, sources).run(requirements)
    manifest = {
        "python_version": target.python_version,
        "platforms": list(target.platforms),
        "wheels": [
            {
                "file": w.path.name,
                "name": w.name,
                "version": str(w.version),
                "bytes": w.size,
                "sha256": hashlib.sha256(w.path.read_bytes()).hexdigest(),
                "reason": w.reason,
                "wanted_by": w.wanted_by,
            }
            for w in result.wheels.values()
        ],
        "target_has": result.satisfied,
        "assumed_present": sorted(result.assumed),
    }
    tmp = dest / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, dest / MANIFEST)
    return result
