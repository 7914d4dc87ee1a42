"""The launch this process belongs to, so that a printed command (resume) is run the way the run was started.

torchrun and accelerate launch start every process of a launch as their own child, with the program's
arguments last: the launcher's part of the command line is the parent's, up to the program it started
(read from /proc on Linux). Where that cannot be read, or another launcher started the processes, the
launch is rebuilt from the environment every launched process gets, in torchrun's form. A process that
no launcher started is resumed by `qlora-pipe` itself.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

# What configures a torchrun launch of accelerate's FSDP / DeepSpeed path (set by the user; accelerate launch
# sets them itself from its config file and flags).
LAUNCH_ENV_PREFIXES = ("ACCELERATE_", "FSDP_")
CONSOLE_SCRIPTS = ("accelerate", "accelerate-launch", "torchrun")
MODULE_FLAGS = ("-m", "--module", "--no_python", "--no-python")  # how the launcher ran the program: ours is -m


def launched() -> bool:
    """Started by torch's elastic agent (torchrun, or accelerate launch, which runs it)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def launcher_prefix(parent_argv: list[str] | None = None, program_args: list[str] | None = None) -> list[str] | None:
    """The launcher's own part of the parent's command line, or None when it is not this process's launcher."""
    args = sys.argv[1:] if program_args is None else program_args
    parent = _parent_argv() if parent_argv is None else parent_argv
    if not parent or not args or len(parent) < len(args) + 2 or parent[-len(args) :] != args:
        return None
    prefix = parent[: -len(args) - 1]  # without the program it started (a script or module) and its arguments
    while prefix and prefix[-1] in MODULE_FLAGS:
        prefix = prefix[:-1]
    return _console_script(prefix)


def _parent_argv() -> list[str] | None:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(part) for part in raw.split(b"\0")[:-1]]


def _console_script(prefix: list[str]) -> list[str]:
    """`python .../bin/accelerate launch` as the user typed it: `accelerate launch` (when that is on PATH)."""
    if len(prefix) >= 2 and Path(prefix[1]).name in CONSOLE_SCRIPTS and Path(prefix[1]).is_file():
        found = shutil.which(Path(prefix[1]).name)
        same = found is not None and Path(found).resolve() == Path(prefix[1]).resolve()
        return [Path(prefix[1]).name if same else prefix[1], *prefix[2:]]
    return prefix


def _torchrun_from_environment() -> list[str]:
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    per_node = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))
    command = ["torchrun", "--nproc_per_node", per_node]
    if nodes > 1:
        command += ["--nnodes", str(nodes), "--node_rank", os.environ.get("GROUP_RANK", "0")]
        command += ["--master_addr", os.environ.get("MASTER_ADDR", "HOST")]
        command += ["--master_port", os.environ.get("MASTER_PORT", "29500")]
    return command


def cli_command(args: list[str]) -> str:
    """`qlora-pipe ARGS` as this process was launched: under torchrun / accelerate launch, the same launch
    (launcher arguments kept, `-m qlora_pipe.cli ARGS` as its program); otherwise `qlora-pipe ARGS`."""
    if not launched():
        return shlex.join(["qlora-pipe", *args])
    prefix = launcher_prefix() or _torchrun_from_environment()
    if any("accelerate" in Path(part).name for part in prefix[:3]):
        settings = []  # accelerate launch sets them again from its config file and flags
    else:
        settings = [f"{k}={shlex.quote(v)}" for k, v in os.environ.items() if k.startswith(LAUNCH_ENV_PREFIXES)]
    return " ".join([*settings, shlex.join([*prefix, "-m", "qlora_pipe.cli", *args])])


def several_machines() -> bool:
    return int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1
