"""The GPU check's dry mode runs here on CPU (tiny shapes, real 4-bit build, real trainer path) so it cannot rot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# The runs below that test the check's own machinery skip the end-to-end CLI stages (a minute on CPU).
MODEL_STAGES = "lengths,longest_sequence,unsloth_anchor,switches,long_context"


def test_gpu_check_dry_run_runs_every_model_stage(tmp_path):
    """Every stage but the two that drive the CLI end to end (those: the slow test below)."""
    from benchmarks.gpu import main
    from benchmarks.gpu_report import gpu_section

    assert main(["--dry", "--out", str(tmp_path), "--stages", MODEL_STAGES + ",torchtune_anchor,flash_attention"]) == 0
    result = json.loads((tmp_path / "gpu-dry.json").read_text())
    assert result["dry"] is True and result["device"] == "cpu (dry run)"
    assert [row["length"] for row in result["lengths"]] == [32, 64]
    for row in result["lengths"]:
        assert row["tokens_per_second"] > 0 and 0 < row["model_flops_per_step"] < row["hardware_flops_per_step"]
        assert row["mfu"] is None and row["hfu"] is None  # no peak FLOPs without a GPU
        # Beside the planner's prediction: its error and the context + slack seen (GPU only: None here).
        assert row["planner_error_percent"] is None and row["cuda_context_bytes"] is None
        assert "allocator_slack_bytes" in row
        planned = row["planned"]  # the planner's prediction sits beside each measurement
        assert 0 < planned["allocated"] < planned["total"] and "transient peak" in planned["terms"]
    search = result["longest_sequence"]
    assert search["longest_fitting_length"] == search["search_limit"] == 128  # nothing runs out of memory on CPU
    assert result["trainable_params"] > 0
    # Every switch has a measurement or the reason it was not run (the GPU-only ones, on CPU).
    switches = {row["switch"]: row for row in result["switches"]}
    assert set(switches) == {"training.activation_offloading", "training.torch_compile", "training.liger_kernels"}
    assert "needs a CUDA GPU" in switches["training.activation_offloading"]["skipped"]
    assert result["references"]["unsloth_llama3.1_8b_qlora_longest_context_24gb"]["tokens"] == 78475
    assert result["errors"] == {} and "search_progress" not in result
    # The anchors at their own settings: ranks 32 and 8 on the same base (16 is ours), labelled with them.
    unsloth, torchtune = result["unsloth_anchor"], result["torchtune_anchor"]
    assert torchtune["trainable_params"] < result["trainable_params"] < unsloth["trainable_params"]
    assert unsloth["default"]["longest_fitting_length"] == 128 and unsloth["meets_goal"] is None
    assert "needs a CUDA GPU" in unsloth["activation_offloading"]["skipped"]
    assert torchtune["reference"]["mfu_implied_on_rtx4090"] == pytest.approx(0.487, abs=0.005)
    assert torchtune["tokens_per_second"] > 0 and torchtune["planned"]["allocated"] > 0
    assert "needs a CUDA GPU" in result["flash_attention"]["skipped"]
    # The long-context stage: the planner's longest per switch, tried (at the dry length on CPU) and 10% above.
    long = result["long_context"]
    for name in ("neither", "tiled_mlp"):
        assert long[name]["planned_longest"] > 128 and long[name]["tokens_at_planned"] == 128
        assert long[name]["fits_at_planned"] is True and long[name]["fits_10_percent_above"] is True
    assert "needs a CUDA GPU" in long["activation_offloading"]["skipped"] and "skipped" in long["both"]
    # The docs tables come from this file: every stage has its row, the anchors beside their figures.
    section = gpu_section(result, "gpu-dry.json")
    assert "a dry run: not a result" in section and "| 64 | " in section
    assert "| torchtune, same settings: MFU | 48.7% (2,413 tokens/s on a 4090) |" in section
    assert "78,475 (HF + FA2: 5,789) | 128 tokens | ≥ 32k: – |" in section


@pytest.mark.skipif(
    os.environ.get("QLORA_PIPE_SLOW_TESTS") != "1",
    reason="the CLI end to end twice (about 80 s on 2 CPU cores; quickstart and resume are tested apart): "
    "set QLORA_PIPE_SLOW_TESTS=1",
)
def test_gpu_check_dry_run_drives_the_cli_paths(tmp_path):
    from benchmarks.gpu import main
    from benchmarks.gpu_report import gpu_section

    assert main(["--dry", "--out", str(tmp_path), "--stages", "quickstart_pipeline,resume_after_sigterm"]) == 0
    result = json.loads((tmp_path / "gpu-dry.json").read_text())
    assert result["errors"] == {}
    # The CUDA-only paths as a user runs them: the quickstart through the CLI (export verified, one answer) ...
    quickstart = result["quickstart_pipeline"]
    assert quickstart["fidelity"]["passed"] is True and quickstart["fidelity"]["top1_agreement"] > 0.9
    assert quickstart["chat_answer"] and set(quickstart["seconds"]) == {"build", "train", "export", "chat"}
    # ... and a run stopped by SIGTERM then resumed gives the straight run's losses, step for step.
    resume = result["resume_after_sigterm"]
    assert resume["stopped_at_step"] >= 3 and resume["steps"] == resume["stopped_at_step"] + 3
    assert resume["equal_within_bf16"] and resume["losses_resumed"] == pytest.approx(resume["losses_straight"], 1e-2)
    section = gpu_section(result, "gpu-dry.json")
    assert "SIGTERM at step" in section and "export verified: top-1 agreement 100.0%" in section


def test_four_bit_build_matches_the_config(tmp_path):
    import bitsandbytes as bnb
    import torch

    from benchmarks.gpu_model import build_4bit_llama, llama_config

    config = llama_config(dry=True)
    model = build_4bit_llama(config, torch.device("cpu"))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * config.num_hidden_layers  # q k v o gate up down; lm_head stays bf16
    assert all(m.weight.quant_state is not None for m in quantized)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, config.vocab_size) and torch.isfinite(logits).all()


def test_dry_run_survives_a_crashed_stage_and_a_simulated_oom_then_resumes(tmp_path, capsys):
    from benchmarks.gpu import main

    dry = ["--dry", "--out", str(tmp_path), "--stages", MODEL_STAGES]
    assert main([*dry, "--oom-above", "96", "--simulate-crash", "switches"]) == 0
    first = json.loads((tmp_path / "gpu-dry.json").read_text())
    assert [row["length"] for row in first["lengths"]] == [32, 64]
    search = first["longest_sequence"]  # doubling to 128 runs out of memory, bisection settles between
    assert (search["longest_fitting_length"], search["first_failing_length"]) == (96, 112)
    assert {"length": 128, "fits": False} in search["tried"]
    assert first["unsloth_anchor"]["default"]["longest_fitting_length"] == 96  # the anchor's search too
    assert first["errors"] == {"switches": "RuntimeError: simulated crash in switches"} and "switches" not in first
    assert "FAILED: RuntimeError: simulated crash in switches" in capsys.readouterr().out  # the summary says so
    assert main([*dry, "--resume"]) == 0  # a second run measures only what is missing
    second = json.loads((tmp_path / "gpu-dry.json").read_text())
    assert second["errors"] == {} and len(second["switches"]) == 3
    assert second["lengths"] == first["lengths"] and second["longest_sequence"] == search
    assert "lengths: measured by an earlier run, kept" in capsys.readouterr().out


def test_a_stage_past_its_time_limit_is_recorded_and_the_next_one_runs(tmp_path):
    from benchmarks.stages import Results

    results = Results(tmp_path / "r.json", {"device": "test"})
    results.run("slow", lambda: 1, 1, {"slow": "hang"})
    results.run("next", lambda: 2, 5, {})
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["errors"] == {"slow": "StageTimeout: slow ran past its limit of 1 s"} and saved["next"] == 2


def test_stages_past_the_checks_budget_are_recorded_as_not_run(tmp_path):
    from benchmarks.stages import Results

    results = Results(tmp_path / "r.json", {"device": "test"}, budget=4, min_stage=2)
    results.run("first", lambda: 1, 60, {})
    results.run("hangs", lambda: 2, 60, {"hangs": "hang"})  # cut at what is left of the budget, not at 60 s
    results.run("last", lambda: 3, 60, {})
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["first"] == 1 and saved["errors"]["hangs"].startswith("StageTimeout: hangs ran past its limit of")
    assert saved["errors"]["last"] == "not run: the check's time budget was spent; rerun with --resume"
    assert saved["stage_seconds"]["hangs"] < 5


def test_results_are_on_disk_when_the_check_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "gpu",
        "--dry",
        "--out",
        str(tmp_path),
        "--simulate-hang",
        "switches",
        "--stages",
        MODEL_STAGES,
    ]
    repo = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    path, deadline = tmp_path / "gpu-dry.json", time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if path.is_file() and "longest_sequence" in json.loads(path.read_text()):
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    saved = json.loads(path.read_text())  # complete JSON: every write was atomic
    assert [row["length"] for row in saved["lengths"]] == [32, 64] and "longest_sequence" in saved
    assert "switches" not in saved and "seconds" not in saved  # killed mid-stage, before the end


def test_planner_error_is_measured_against_the_allocator_peak():
    from benchmarks.gpu import planner_error_percent

    assert planner_error_percent({"allocated": 11 * 2**30}, 10 * 2**30) == 10.0  # the planner predicted 10% high
    assert planner_error_percent({"allocated": 9 * 2**30}, 10 * 2**30) == -10.0
    assert planner_error_percent(None, 10) is None and planner_error_percent({"allocated": 1}, None) is None
