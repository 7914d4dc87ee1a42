"""Time the offline quickstart (build, train, export) on this machine, and say which CPU it was.

    python -m benchmarks quickstart                  # this CPU as it is
    python -m benchmarks quickstart --emulate-avx2   # as on an AVX2-only CPU (no AVX-512, no native bf16)

``--emulate-avx2`` caps PyTorch's own kernels (ATEN_CPU_CAPABILITY=avx2), MKL
(MKL_ENABLE_INSTRUCTIONS=AVX2) and oneDNN (ONEDNN_MAX_CPU_ISA=AVX2) below AVX-512, so a CPU with
native bf16 computes as an AVX2-only one:
one 2048x512 by 512x1536 linear (forward + backward) took 5.25 s in bf16 that way, the figure
measured on a real AVX2-only machine (5.3 s). Each step runs in a fresh process in a temporary
folder; results go to benchmarks/results/quickstart-<date>-<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from qlora_pipe.machine.hardware import cpu_hardware, machine_description

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python -m benchmarks quickstart"

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def timed(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> float:
    started = time.time()
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (rc {done.returncode}); see {log}")
    return round(time.time() - started, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--emulate-avx2", action="store_true", help="compute as an AVX2-only CPU would")
    parser.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/quickstart-...)")
    args = parser.parse_args(argv)
    env = {**os.environ, **(AVX2_ONLY if args.emulate_avx2 else {})}
    os.environ.update(env)  # so machine_description and the detection below see the cap
    work = Path(tempfile.mkdtemp(prefix="quickstart-bench-"))
    for item in ("data", "recipes", "scripts", "qlora_pipe"):
        (work / item).symlink_to(REPO / item)
    steps = {
        "build": [sys.executable, "scripts/build_quickstart_model.py"],
        "train": [sys.executable, "scripts/train.py", "recipes/quickstart.yaml"],
        "export": [sys.executable, "scripts/export_merged.py"],
    }
    seconds = {}
    for name, command in steps.items():
        print(f"{name}: {' '.join(command)}", flush=True)
        seconds[name] = timed(command, env, work, work / f"{name}.log")
        print(f"  {seconds[name]} s", flush=True)
    summary = json.loads((work / "runs/quickstart/summary.json").read_text())
    hardware = cpu_hardware()
    result = {
        "date": date.today().isoformat(),
        "machine": machine_description(),
        "emulated_avx2_only": args.emulate_avx2,
        "command": COMMAND + (" --emulate-avx2" if args.emulate_avx2 else ""),
        "native_bf16": hardware.native_bf16,
        "wall_seconds": seconds,
        "compute": summary["compute"],
        "train_seconds": summary["train_seconds"],
        "supervised_tokens_per_second": summary["supervised_tokens_per_second"],
        "eval_loss_before": summary["eval_loss_before"],
        "final_eval_loss": summary["final_eval_loss"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "versions": summary["versions"],
    }
    tag = "avx2-emulated" if args.emulate_avx2 else ("native-bf16" if hardware.native_bf16 else "no-native-bf16")
    out = args.out or REPO / f"benchmarks/results/quickstart-{result['date']}-{tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out} (logs in {work})")
    return 0
