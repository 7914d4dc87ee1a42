"""A file system of a test's own: a small or read-only tmpfs mounted in a user and mount namespace (unshare), so
that a full or unwritable disk is real without touching this machine's; and the one error line a command gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

MOUNTED = (  # a fresh tmpfs at $2 (options $1), the command, then what the tmpfs holds: gone with the namespace
    'mount -t tmpfs -o "$1" tmpfs "$2" || exit 97; where="$2"; shift 2; "$@"; code=$?; '
    'echo "--- left:"; find "$where" -mindepth 1 | sort; exit $code'
)


def mounts_prefix() -> list[str]:
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", MOUNTED, "sh"]


def cli_in(prefix: list[str], options: str, cache: Path, *args: str) -> tuple[int, str, list[str]]:
    """``qlora-pipe ARGS`` with XDG_CACHE_HOME on a tmpfs of these options: exit code, stderr, what it left."""
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "OMP_NUM_THREADS": "1"}
    command = [*prefix, options, str(cache), sys.executable, "-m", "qlora_pipe.cli", *args]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    left = done.stdout.split("--- left:\n", 1)[-1].split()
    return done.returncode, done.stderr, [str(Path(p).relative_to(cache)) for p in left]


def one_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]
