"""The command line as a user runs it: `python -m qlora_pipe.cli` in a child process (one thread, offline),
and the check that a bad input ends in one line naming what is wrong, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "QLORA_PIPE_CPU_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlora_pipe.cli", *args], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith("error: ") and all(text in last for text in expected), last
