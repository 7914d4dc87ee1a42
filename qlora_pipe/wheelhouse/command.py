"""`qlora-pipe wheelhouse DIR`: print each wheel, what the target has, the total and the offline install."""

from __future__ import annotations

from pathlib import Path

from qlora_pipe.errors import UserError
from qlora_pipe.sizes import parse_size
from qlora_pipe.wheelhouse.resolve import build_wheelhouse, pinned_versions, project_requirements
from qlora_pipe.wheelhouse.target import DEFAULT_PLATFORMS, Target, parse_have_item, read_have


def run_wheelhouse(
    dest: Path,
    purpose: str,
    python_version: str,
    platforms: list[str],
    have: list[str],
    have_files: list[Path],
    extras: list[str],
    max_size: str | None,
    sources: tuple[str, ...] = (),
    pins: list[str] = (),
) -> int:
    limit = parse_size(max_size, "--max-size") if max_size else None
    target = Target(python_version, tuple(platforms) or DEFAULT_PLATFORMS, read_have(have, have_files))
    requirements = project_requirements(purpose, tuple(extras))
    print(f"wheels for {purpose} on Python {target.python_version}, {target.platforms[0]} and older, into {dest}:")
    chosen = pinned_versions() | {name: version for name, version in (parse_have_item(p, "--pin") for p in pins)}
    if any(version is None for version in chosen.values()):
        raise UserError("--pin: give NAME==VERSION")
    result = build_wheelhouse(dest, target, requirements, sources=sources, pins=chosen)
    if not result.wheels:
        print("  none: the target has everything")
    if result.satisfied:
        print("target has, in range: " + ", ".join(f"{n} {v}" for n, v in sorted(result.satisfied.items())))
    if result.assumed:
        print("target has, version not given (trusted): " + ", ".join(sorted(result.assumed)))
    total = sum(wheel.size for wheel in result.wheels.values())
    print(
        f"total: {len(result.wheels)} wheels, {total / 2**20:.1f} MiB ({total:,} bytes); list in {dest}/wheelhouse.json"
    )
    if limit is not None and total > limit:
        raise UserError(f"--max-size: the wheels take {total / 2**20:.1f} MiB, over {max_size}")
    print(
        f"install on the target, no network: pip install --no-index --no-deps --target SITE {dest}/*.whl "
        "&& export PYTHONPATH=SITE:$PYTHONPATH"
    )
    return 0
