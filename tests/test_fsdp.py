"""FSDP2 with QLoRA, launched for real: two processes (gloo on CPU) shard the 4-bit model and its adapter.

The shipped accelerate/fsdp_qlora.yaml is launched as a user launches it (only ``--mixed_precision no``: fp32
compute and fp32 4-bit storage, so the run can be compared with one process bit for bit up to reduction
order). Compared with one process on the same global batch: the per-step losses, the eval losses and the
adapter; then the FSDP run is exported (and verified) and chatted with like any other run, and its
checkpoint refuses a resume by a different number of processes.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, recipe_dict

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "accelerate" / "fsdp_qlora.yaml"
LOSS_TOLERANCE = 1e-4  # absolute, on training losses near 6.2: measured differences are below 2e-6
# Eval loss is the mean of per-batch means, and one process sees the held-out rows 4 at a time where each of
# the two sees them 2 at a time: measured 1.1e-4 apart (as under DDP, tests/test_ddp.py), not FSDP's doing.
EVAL_TOLERANCE = 1e-3
ADAPTER_TOLERANCE = 1e-3  # relative to the adapter's largest weight: measured 2e-4 (lr 1e-2 amplifies rounding)
# torchrun reads FSDP from the same environment accelerate launch sets from the config file.
TORCHRUN_FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
}


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def write_recipe(tiny_model_dir: Path, tmp_path: Path, name: str, micro: int, **training) -> Path:
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs", micro_batch_size=micro, **training)
    raw["run_name"] = name
    raw["quantization"] = {"compute_dtype": "float32", "quant_storage": "float32"}
    raw["training"]["precision"] = "fp32"
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def accelerate_fsdp(recipe: Path, *extra: str, config: Path = CONFIG) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "qlora_pipe.cli",
        "train",
        str(recipe),
        *extra,
    ]


def torchrun(recipe: Path, *extra: str) -> list[str]:
    port = str(free_port())
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    return [*launcher, "-m", "qlora_pipe.cli", "train", str(recipe), *extra]


def cli(*args: str) -> subprocess.CompletedProcess:
    """One process, as a user runs it."""
    command = [sys.executable, "-m", "qlora_pipe.cli", *args]
    return subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)


def metrics(run: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter_model.safetensors")


def test_two_process_fsdp_matches_one_process(tiny_model_dir, tmp_path):
    single = write_recipe(tiny_model_dir, tmp_path, "single", 4, max_steps=4, save_steps=2)
    fsdp = write_recipe(tiny_model_dir, tmp_path, "fsdp", 2, max_steps=4, save_steps=2)  # global batch 4 either way
    one = cli("train", str(single))
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(accelerate_fsdp(fsdp), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    run1, run2 = tmp_path / "runs/single", tmp_path / "runs/fsdp"
    (loss1, eval1), (loss2, eval2) = metrics(run1), metrics(run2)
    assert len(loss1) == len(loss2) == 4 and len(eval1) == len(eval2) == 2
    assert all(abs(a - b) < LOSS_TOLERANCE for a, b in zip(loss1, loss2, strict=True))
    assert all(abs(a - b) < EVAL_TOLERANCE for a, b in zip(eval1, eval2, strict=True))
    a1, a2 = adapter(run1), adapter(run2)  # written once, by the first process, in PEFT's format
    assert sorted(a1) == sorted(a2) and all(v.dtype == a1[k].dtype for k, v in a2.items())
    largest = max(float(v.abs().max()) for v in a1.values())
    assert max(float((a1[k] - a2[k]).abs().max()) for k in a1) <= ADAPTER_TOLERANCE * largest
    s1, s2 = (json.loads((run / "summary.json").read_text()) for run in (run1, run2))
    assert s2["processes"] == 2 and s1["supervised_tokens"] == s2["supervised_tokens"]
    assert two.stdout.count("finished:") == 1

    # It really was FSDP: each process wrote its shard of the adapter; the marker covers both ranks' files.
    checkpoint = run2 / "checkpoints/checkpoint-4"
    marker = json.loads((checkpoint / "checkpoint_complete.json").read_text())
    assert marker["processes"] == 2 and marker["sharding"] == "fsdp"
    for rank in (0, 1):
        assert f"pytorch_model_fsdp_0/__{rank}_0.distcp" in marker["files"]
        assert f"optimizer_0/__{rank}_0.distcp" in marker["files"] and f"rng_state_{rank}.pth" in marker["files"]

    exported = cli("export", str(run2))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads((run2 / "merged/fidelity.json").read_text())["passed"]
    chat = cli("chat", str(run2), "--prompt", "What is an offer?", "--greedy", "--max-new-tokens", "4")
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-2000:]

    # A checkpoint of two processes resumed by one: refused in one line before anything loads.
    (run2 / "summary.json").unlink()
    resumed = cli("train", str(fsdp), "--resume")
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    line = resumed.stderr.strip().splitlines()[-1]
    assert "saved by a FSDP launch of 2 processes, this launch has 1" in line


def _wait_for_step(run: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (run / "metrics.jsonl").is_file() and f'"step": {step},' in (run / "metrics.jsonl").read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"run did not reach step {step}: {process.poll()}")


def _worker(launcher: subprocess.Popen, rank: int) -> int:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "qlora_pipe.cli" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker of rank {rank}")


def test_a_stopped_launch_prints_the_launch_that_resumes_it(tiny_model_dir, tmp_path):
    """An accelerate FSDP launch with the recipe's default optimizer (bitsandbytes' paged_adamw_8bit, which cannot
    step sharded parameters): it trains with adamw_torch_fused, said once. SIGTERM to one process: the resume
    command is printed once, by the first process, and it is the same accelerate launch with --resume (run as
    printed in the torchrun test below); a resume by one process is refused with that command."""
    path = write_recipe(tiny_model_dir, tmp_path, "stopped", 2, max_steps=400, save_steps=1000)
    raw = yaml.safe_load(path.read_text())
    del raw["training"]["optimizer"]  # the default
    path.write_text(yaml.safe_dump(raw))
    launch = accelerate_fsdp(path)
    run = tmp_path / "runs/stopped"
    launcher = subprocess.Popen(launch, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, 1, launcher)
    os.kill(_worker(launcher, 1), signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=300)
    printed = [line for line in stderr.splitlines() if "Resume with: " in line]
    assert len(printed) == 1, stderr[-3000:]
    command = printed[0].split("Resume with: ", 1)[1]
    assert shlex.split(command) == [*launch, "--resume"]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["resume_command"] == command and status["step"] >= 2
    assert stderr.count("training.optimizer paged_adamw_8bit runs as adamw_torch_fused under FSDP") == 1
    assert "no GPU: optimizer" not in stderr

    from qlora_pipe import UserError, load_recipe
    from qlora_pipe.training.stage import run_training

    with pytest.raises(UserError, match=r"this launch has 1; resume with 2 processes: ") as refused:
        run_training(load_recipe(path), resume=True)  # one process: refused before anything loads
    assert str(refused.value).endswith(f"2 processes: {command}")


@pytest.mark.skipif(os.environ.get("QLORA_PIPE_SLOW_TESTS") != "1", reason="slow: set QLORA_PIPE_SLOW_TESTS=1")
def test_sigterm_on_one_rank_stops_all_and_the_resume_is_exact(tiny_model_dir, tmp_path):
    """torchrun, FSDP from the environment: SIGTERM to rank 1 alone stops both ranks at the same step
    boundary with one complete sharded checkpoint; the resumed run equals an uninterrupted one."""
    steps = 24
    straight = write_recipe(tiny_model_dir, tmp_path, "straight", 2, max_steps=steps, save_steps=1000)
    stopped = write_recipe(tiny_model_dir, tmp_path, "stopped", 2, max_steps=steps, save_steps=1000)
    fsdp_env = env(**TORCHRUN_FSDP_ENV)
    done = subprocess.run(torchrun(straight), cwd=REPO, env=fsdp_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "runs/stopped"
    launcher = subprocess.Popen(
        torchrun(stopped), cwd=REPO, env=fsdp_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(run, 3, launcher)
    os.kill(_worker(launcher, 1), signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    assert "stopped by SIGTERM at step" in stderr
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["signal"] == "SIGTERM" and status["step"] < steps
    checkpoints = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint-")]
    assert checkpoints == [f"checkpoint-{status['step']}"]
    marker = json.loads((run / "checkpoints" / checkpoints[0] / "checkpoint_complete.json").read_text())
    assert marker["processes"] == 2 and {f"pytorch_model_fsdp_0/__{r}_0.distcp" for r in (0, 1)} <= set(marker["files"])

    # Run as printed, through a shell: the FSDP settings come first, as the variables torchrun's processes need.
    printed = [line for line in stderr.splitlines() if "Resume with: " in line]
    assert len(printed) == 1, stderr[-3000:]
    command = printed[0].split("Resume with: ", 1)[1]
    assert "ACCELERATE_USE_FSDP=true " in command and "-m torch.distributed.run --nproc_per_node 2 " in command
    resumed = subprocess.run(command, shell=True, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics(run) == metrics(tmp_path / "runs/straight")
    a, b = adapter(run), adapter(tmp_path / "runs/straight")
    assert all(bool((a[k] == b[k]).all()) for k in a)
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


def test_two_process_deepspeed_zero3_matches_one_process(tiny_model_dir, tmp_path):
    """The shipped ZeRO-3 config, where deepspeed is installed (not a dependency: measured with deepspeed 0.19.8
    in a separate environment, docs/multi-gpu.md). DeepSpeed runs on CPU through its own CPU accelerator."""
    pytest.importorskip("deepspeed")
    single = write_recipe(tiny_model_dir, tmp_path, "single", 4, max_steps=4, save_steps=2)
    zero3 = write_recipe(tiny_model_dir, tmp_path, "zero3", 2, max_steps=4, save_steps=2)
    assert cli("train", str(single)).returncode == 0
    config = CONFIG.with_name("deepspeed_zero3.yaml")
    two = subprocess.run(
        accelerate_fsdp(zero3, config=config), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600
    )
    assert two.returncode == 0, two.stderr[-3000:]
    run1, run2 = tmp_path / "runs/single", tmp_path / "runs/zero3"
    assert all(abs(a - b) < LOSS_TOLERANCE for a, b in zip(metrics(run1)[0], metrics(run2)[0], strict=True))
    a1, a2 = adapter(run1), adapter(run2)
    largest = max(float(v.abs().max()) for v in a1.values())
    assert max(float((a1[k] - a2[k]).abs().max()) for k in a1) <= ADAPTER_TOLERANCE * largest
    marker = json.loads((run2 / "checkpoints/checkpoint-4/checkpoint_complete.json").read_text())
    assert marker["processes"] == 2 and marker["sharding"] == "deepspeed"
    assert {f"global_step4/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(marker["files"])


@pytest.mark.skipif(os.environ.get("QLORA_PIPE_SLOW_TESTS") != "1", reason="slow: set QLORA_PIPE_SLOW_TESTS=1")
def test_dpo_under_fsdp_matches_one_process(tiny_model_dir, tmp_path):
    """method: dpo under the shipped FSDP config: TRL's reference pass (the adapter disabled) and the held-out
    reward accuracy, computed by both processes in step, agree with one process."""
    from tests.helpers.recipes import dpo_recipe

    paths = {}
    for name, micro in (("dpo1", 4), ("dpo2", 2)):
        raw = dpo_recipe(tiny_model_dir, tmp_path, name=name, max_steps=4, micro_batch_size=micro, save_steps=2)
        raw["quantization"] = {"compute_dtype": "float32", "quant_storage": "float32"}
        raw["training"]["precision"] = "fp32"
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(raw))
    assert cli("train", str(paths["dpo1"])).returncode == 0
    two = subprocess.run(accelerate_fsdp(paths["dpo2"]), cwd=REPO, env=env(), capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    run1, run2 = tmp_path / "runs/dpo1", tmp_path / "runs/dpo2"
    assert all(abs(a - b) < LOSS_TOLERANCE for a, b in zip(metrics(run1)[0], metrics(run2)[0], strict=True))
    scores = [json.loads((run / "preference_eval.json").read_text()) for run in (run1, run2)]
    assert scores[0]["after"]["reward_accuracy"] == scores[1]["after"]["reward_accuracy"]
    a1, a2 = adapter(run1), adapter(run2)
    largest = max(float(v.abs().max()) for v in a1.values())
    assert max(float((a1[k] - a2[k]).abs().max()) for k in a1) <= 2 * ADAPTER_TOLERANCE * largest  # measured 1.4e-3
