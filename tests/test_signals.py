"""A training process seen from outside: SIGTERM and Ctrl-C stop it at a step boundary with a checkpoint,
and its run directory is its own while it runs (the lock dies with the process)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qlora_pipe.errors import UserError
from qlora_pipe.runs import RunDir
from qlora_pipe.training.checkpoints import latest_valid_checkpoint
from qlora_pipe.training.stage import run_training
from tests.conftest import recipe_dict

REPO = Path(__file__).resolve().parents[1]


def _start_cli_run(tiny_model_dir: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, RunDir, Path]:
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs", max_steps=400, save_steps=1000, logging_steps=1)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    process = subprocess.Popen(
        [sys.executable, "-m", "qlora_pipe.cli", "train", str(path), *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, RunDir(tmp_path / "runs" / "test"), path


def _wait_for_step(run: RunDir, step: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if run.metrics.is_file() and any(f'"step": {step},' in line for line in run.metrics.read_text().splitlines()):
            return
        time.sleep(0.2)
    raise AssertionError(f"run did not reach step {step}: {process.poll()}")


def test_sigterm_checkpoints_at_the_next_step_and_resume_finishes(tiny_model_dir, tmp_path):
    """SIGTERM, repeated while the step ends and the checkpoint is written (process managers send several
    before their kill timeout): the run still checkpoints, reads interrupted and exits 143."""
    process, _, path = _start_cli_run(tiny_model_dir, tmp_path, "--set", "run_name=sigterm")
    run = RunDir(tmp_path / "runs" / "sigterm")
    _wait_for_step(run, 2, process)
    process.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    while process.poll() is None and time.time() < deadline:  # more SIGTERMs until the process has ended
        process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr[-2000:]
    # The printed command keeps the --set overrides: run as printed, it resumes this run, not another.
    assert f"Resume with: qlora-pipe train {path} --set run_name=sigterm --resume" in stderr
    status = json.loads(run.status.read_text())
    assert status["state"] == "interrupted" and status["signal"] == "SIGTERM"
    checkpoint = latest_valid_checkpoint(run.checkpoints)
    assert checkpoint is not None and checkpoint.name == f"checkpoint-{status['step']}"
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_pipe.cli",
            "train",
            str(path),
            "--set",
            "run_name=sigterm",
            "--resume",
            "--set",
            f"training.max_steps={status['step'] + 2}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(run.summary.read_text())["steps"] == status["step"] + 2


def test_second_ctrl_c_quits_at_once(tiny_model_dir, tmp_path):
    process, run, _ = _start_cli_run(tiny_model_dir, tmp_path)
    _wait_for_step(run, 2, process)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert not run.is_finished()


def test_one_training_per_run_directory_and_a_crash_leaves_no_stuck_lock(tiny_model_dir, tmp_path):
    """--overwrite while another training writes into the run directory is refused (before it deletes
    anything); once that process is killed (-9), the lock is gone with it."""
    from qlora_pipe.recipe import load_recipe

    process, run, path = _start_cli_run(tiny_model_dir, tmp_path)
    try:
        _wait_for_step(run, 1, process)
        recipe = load_recipe(path, ["training.max_steps=2"])
        with pytest.raises(UserError, match=rf"runs/test is in use by another training \(pid {process.pid}\)"):
            run_training(recipe, overwrite=True)
        assert run.metrics.is_file() and run.resolved_recipe.is_file()  # the live run's files are untouched
    finally:
        process.kill()
        process.communicate(timeout=60)
    assert run_training(recipe, overwrite=True).run_dir.is_finished()
