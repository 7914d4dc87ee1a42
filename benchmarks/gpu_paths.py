"""The GPU check's end-to-end stages: the paths only a CUDA machine takes, run once as a user runs them.

- ``quickstart_pipeline``: the offline quickstart through the real CLI (build the tiny model, train
  with the paged 8-bit optimizer and bitsandbytes' CUDA 4-bit kernels, export with verification,
  chat one answer);
- ``resume_after_sigterm``: a run stopped by SIGTERM (as a lease ending stops it) and resumed, beside
  the same run uninterrupted: the per-step losses must agree within bf16 rounding.

Each command runs in its own process in a scratch copy of the repository's layout, with its log kept;
a failure raises with the log's last lines, and the stage records it. Dry runs use a few steps on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Briefly, what is meant by a subpoena under the law?"
# bf16 keeps 8 significant bits: two runs of the same steps may differ by a rounding of the loss.
BF16_RELATIVE = 2**-7


def scratch(work: Path) -> Path:
    """A folder that looks like the repository to the CLI (recipes, data) but keeps its runs and models."""
    work.mkdir(parents=True, exist_ok=True)
    for item in ("data", "recipes", "scripts"):
        if not (work / item).exists():
            (work / item).symlink_to(REPO / item)
    return work


def cli_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not _cuda():
        env.setdefault("QLORA_PIPE_CPU_THREADS", "1")  # CPU rehearsal: one thread, beside the parent's
    return env


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def qlora_pipe(work: Path, log_name: str, *args: str) -> float:
    """Run one qlora-pipe command to completion (stdout in <log_name>.out, stderr in <log_name>.log);
    its wall seconds, or an error with the log's end."""
    log, out = work / f"{log_name}.log", work / f"{log_name}.out"
    started = time.time()
    with log.open("w") as errors, out.open("w") as output:
        command = [sys.executable, "-m", "qlora_pipe.cli", *args]
        done = subprocess.run(command, cwd=work, env=cli_env(), stdout=output, stderr=errors)
    if done.returncode != 0:
        raise RuntimeError(f"qlora-pipe {' '.join(args)} exited {done.returncode}: {tail(log)}")
    return round(time.time() - started, 1)


def tail(log: Path, chars: int = 400) -> str:
    return " ".join(log.read_text(errors="replace")[-chars:].split())


def quickstart_pipeline(work: Path, dry: bool) -> dict[str, Any]:
    """Build, train, export (verified) and chat, as the README's quickstart does."""
    scratch(work)
    steps = ["--set", "training.max_steps=4", "--set", "training.preview_max_new_tokens=4"] if dry else []
    build = ["--steps", "5"] if dry else []
    seconds = {
        "build": qlora_pipe(work, "build", "build-quickstart-model", "--out", "models/quickstart-base", *build),
        "train": qlora_pipe(work, "train", "train", "recipes/quickstart.yaml", *steps),
        "export": qlora_pipe(work, "export", "export", "runs/quickstart"),
        "chat": qlora_pipe(
            work, "chat", "chat", "runs/quickstart/merged", "--prompt", PROMPT, "--max-new-tokens", "24"
        ),
    }
    summary = json.loads((work / "runs/quickstart/summary.json").read_text())
    fidelity = json.loads((work / "runs/quickstart/merged/fidelity.json").read_text())
    answer = (work / "chat.out").read_text(errors="replace").strip()
    kept = ("device", "compute", "peak_memory_bytes", "peak_memory_kind", "eval_loss_before", "final_eval_loss")
    return {
        "seconds": seconds,
        **{key: summary.get(key) for key in kept},
        "optimizer_notice": "paged_adamw_8bit"
        if "runs as adamw_8bit" not in (work / "train.log").read_text()
        else "adamw_8bit (no CUDA: paging off)",
        "fidelity": {k: v for k, v in fidelity.items() if not isinstance(v, (list, dict))},
        "chat_answer": answer,
    }


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {int(row["step"]): float(row["loss"]) for row in rows if "loss" in row}


def resume_after_sigterm(work: Path, dry: bool, stop_at: int = 3) -> dict[str, Any]:
    """SIGTERM a run at ``stop_at`` steps, resume it, and compare every step's loss with a straight run.

    The interrupted run is started long (400 steps), so the signal lands mid-run even on a fast GPU; the
    learning rate is constant, so ending both at the same step later gives them the same schedule."""
    scratch(work)
    if not (work / "models/quickstart-base/config.json").is_file():
        qlora_pipe(work, "build", "build-quickstart-model", "--out", "models/quickstart-base", "--steps", "5")
    common = [
        "--set", "training.lr_scheduler=constant", "--set", "training.warmup_ratio=0",
        "--set", "training.logging_steps=1", "--set", "training.save_steps=1000", "--set", "training.eval_steps=1000",
        "--set", "training.preview_max_new_tokens=4",
    ]  # fmt: skip
    cut = work / "runs/resume-cut"
    log = work / "resume-cut.log"
    recipe = "recipes/quickstart.yaml"
    with log.open("w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "qlora_pipe.cli", "train", recipe, "--set", "run_name=resume-cut", *common,
             "--set", "training.max_steps=400"],
            cwd=work, env=cli_env(), stdout=handle, stderr=handle,
        )  # fmt: skip
        deadline = time.time() + (300 if dry else 120)
        while process.poll() is None and time.time() < deadline:
            if (cut / "metrics.jsonl").is_file() and len(losses(cut)) >= stop_at:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=300)
    if code != 128 + signal.SIGTERM:
        raise RuntimeError(f"the interrupted run exited {code}, not {128 + signal.SIGTERM}: {tail(log)}")
    stopped = json.loads((cut / "status.json").read_text())["step"]
    end = ["--set", f"training.max_steps={stopped + 3}"]
    seconds = qlora_pipe(work, "resume", "train", recipe, "--set", "run_name=resume-cut", *common, *end, "--resume")
    qlora_pipe(work, "straight", "train", recipe, "--set", "run_name=resume-straight", *common, *end)
    resumed, straight = losses(cut), losses(work / "runs/resume-straight")
    if sorted(resumed) != sorted(straight):
        raise RuntimeError(f"logged steps differ: resumed {sorted(resumed)}, straight {sorted(straight)}")
    worst = max(abs(resumed[s] - straight[s]) / max(abs(straight[s]), 1e-6) for s in straight)
    return {
        "stopped_at_step": stopped,
        "steps": len(straight),
        "resume_seconds": seconds,
        "max_relative_loss_difference": worst,
        "equal_within_bf16": worst <= BF16_RELATIVE,
        "losses_resumed": [resumed[s] for s in sorted(resumed)],
        "losses_straight": [straight[s] for s in sorted(straight)],
    }
