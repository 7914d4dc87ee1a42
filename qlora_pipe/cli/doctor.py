"""`qlora-pipe doctor`: is this machine ready to train? Versions against the tested set, the GPU and its
driver, bitsandbytes' backend, optional kernels, the dtype and threads a run would use, and disk space."""

from __future__ import annotations

import importlib.util
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
OPTIONAL = {"flash_attn": "flash-attn (model.attn_implementation: flash_attention_2)", "liger_kernel": "liger-kernel"}
LOW_DISK_BYTES = 50 * 2**30  # a 7B run: the base download, checkpoints and a merged export


def tested_versions() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[name.strip()] = pinned.strip()
    return pins


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def version_lines() -> tuple[list[str], int]:
    lines, mismatches = [], 0
    for name, pinned in tested_versions().items():
        have = installed(name)
        same = have is not None and have.split("+")[0] == pinned
        mismatches += not same
        verdict = "tested" if same else f"tested with {pinned}"
        lines.append(f"  {'ok  ' if same else 'warn'} {name} {have or 'not installed'} ({verdict})")
    return lines, mismatches


def device_lines() -> list[str]:
    import torch

    from qlora_pipe.machine.cpu_threads import choose_cpu_threads
    from qlora_pipe.machine.hardware import detect_hardware, machine_description, resolve_precision

    hardware = detect_hardware()
    choice = resolve_precision("auto", "auto", hardware)
    lines = [f"  machine: {machine_description()}"]
    if torch.cuda.is_available():
        lines.append(f"  CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {hardware.describe()}")
    else:
        threads = choose_cpu_threads()
        lines.append(f"  no CUDA GPU: runs on the CPU with {threads.threads} threads ({threads.reason})")
    lines.append(f"  precision auto -> {choice.precision} ({choice.reason})")
    from qlora_pipe.compat.bitsandbytes import INSTALL_HINT, kernel_description, load_problem

    problem = load_problem()  # a broken install is reported as a failure, not a crash of the doctor
    if problem is None:
        lines.append(f"  ok   bitsandbytes 4-bit kernel: {kernel_description()}")
    else:
        lines.append(f"  FAIL bitsandbytes does not load ({problem}): no 4-bit model can load; {INSTALL_HINT}")
    for module, what in OPTIONAL.items():
        found = importlib.util.find_spec(module) is not None
        lines.append(f"  {'ok  ' if found else '-   '} {what}: {'installed' if found else 'not installed (optional)'}")
    return lines


def disk_line(folder: Path) -> str:
    probe = folder if folder.exists() else Path.cwd()
    free = shutil.disk_usage(probe).free
    verdict = "ok  " if free >= LOW_DISK_BYTES else "warn"
    return f"  {verdict} {free / 2**30:.1f} GiB free for {folder} (a 7B run wants about {LOW_DISK_BYTES // 2**30} GiB)"


def run_doctor(output_dir: str = "runs") -> int:
    lines, mismatches = version_lines()
    print("versions (against qlora_pipe/constraints.txt):")
    print("\n".join(lines))
    print("device:")
    print("\n".join(device_lines()))
    print("disk:")
    print(disk_line(Path(output_dir)))
    if mismatches:
        print(f"{mismatches} version(s) differ from the tested set: pip install -c qlora_pipe/constraints.txt ...")
    from qlora_pipe.compat.bitsandbytes import load_problem

    if load_problem() is not None:  # the pipeline cannot run without it: not a warning
        print("not ready: bitsandbytes does not load (see above)")
        return 1
    return 0
