"""Training that survives: exact resume, checkpoint integrity, bad steps, save failures (signals: test_signals.py)."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from qlora_pipe.errors import CheckpointWriteError, TrainingAborted, UserError
from qlora_pipe.runs import RunDir
from qlora_pipe.training.checkpoints import MARKER, checkpoint_problem, latest_valid_checkpoint
from qlora_pipe.training.resume import resolve_checkpoint
from qlora_pipe.training.stage import run_training
from tests.conftest import recipe_dict
from tests.helpers.crashes import CrashAtStep, SimulatedCrash, losses

REPO = Path(__file__).resolve().parents[1]
FP32 = {"compute_dtype": "float32"}


class NaNAtSteps(TrainerCallback):
    """Makes the forward pass NaN during the given (1-based) optimizer steps, on the real model."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.handle, self.final = steps, None, {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps:
            embeddings = model.get_input_embeddings()
            self.handle = embeddings.register_forward_hook(lambda mod, inp, out: out * float("nan"))

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle:
            self.handle.remove()
            self.handle = None

    def on_train_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        steps = {int(s["step"]) for s in optimizer.state_dict()["state"].values()}
        self.final = {"optimizer_steps": steps, "scheduler_steps": lr_scheduler.last_epoch}


def fp32_recipe(make_recipe, name: str, dtype: str = "float32", **training):
    precision = "fp32" if dtype == "float32" else "bf16"
    recipe = make_recipe(
        quantization={"compute_dtype": dtype}, lora={"dropout": 0.1}, **{"precision": precision, **training}
    )
    recipe.run_name = name
    return recipe


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_crash_and_resume_reproduce_the_uninterrupted_run(make_recipe, dtype):
    straight = run_training(fp32_recipe(make_recipe, "straight", dtype, max_steps=8, save_steps=3))
    crashed = fp32_recipe(make_recipe, "crashed", dtype, max_steps=8, save_steps=3)
    with pytest.raises(SimulatedCrash):
        run_training(crashed, callbacks=(CrashAtStep(5),))
    run = RunDir(crashed.run_dir())
    assert not run.is_finished() and json.loads(run.status.read_text())["state"] == "failed"
    assert latest_valid_checkpoint(run.checkpoints).name == "checkpoint-3"

    resumed_recipe = fp32_recipe(make_recipe, "crashed", dtype, max_steps=8, save_steps=3, preview_max_new_tokens=9)
    resumed = run_training(resumed_recipe, resume=True)  # a harmless change is allowed
    assert [s for s, _ in losses(resumed.run_dir)] == list(range(1, 9))
    a = load_file(straight.run_dir.adapter_weights)
    b = load_file(resumed.run_dir.adapter_weights)
    assert a.keys() == b.keys()
    if dtype == "float32":  # bitwise
        assert losses(resumed.run_dir) == losses(straight.run_dir)
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:  # bf16 compute: within 1e-5
        assert all(
            abs(x - y) <= 1e-5 for (_, x), (_, y) in zip(losses(resumed.run_dir), losses(straight.run_dir), strict=True)
        )
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=0) for k in a)
    assert resumed.summary["trainable_params"] == straight.summary["trainable_params"]
    assert resumed.summary["supervised_tokens"] == straight.summary["supervised_tokens"]
    assert resumed.summary["eval_loss_before"] == straight.summary["eval_loss_before"]


def test_resume_refuses_a_recipe_that_changes_what_is_trained(make_recipe):
    recipe = make_recipe(max_steps=4, save_steps=2)
    with pytest.raises(SimulatedCrash):
        run_training(recipe, callbacks=(CrashAtStep(3),))
    changed = make_recipe(max_steps=4, save_steps=2, lora={"r": 16})
    changed.data.max_length = 200
    with pytest.raises(UserError, match=r"cannot resume .*data\.max_length: 256 -> 200; lora\.r: 8 -> 16"):
        run_training(changed, resume=True)
    fresh = make_recipe(max_steps=4)
    fresh.run_name = "never-started"
    with pytest.raises(UserError, match="nothing to resume"):
        run_training(fresh, resume=True)


def test_resume_never_ignores_a_change(make_recipe, tmp_path, caplog):
    """A training key the restored optimizer would silently override (the learning rate) is refused; one a
    resumed run does apply (how often to log) is applied, said and recorded; changed data files are refused."""
    import shutil

    from tests.conftest import TRAIN

    data = tmp_path / "train.jsonl"
    shutil.copy(TRAIN, data)

    def recipe(**training):
        r = make_recipe(max_steps=4, save_steps=2, **training)
        r.data.train_path = str(data)
        return r

    with pytest.raises(SimulatedCrash):
        run_training(recipe(), callbacks=(CrashAtStep(3),))
    with pytest.raises(UserError, match=r"cannot resume .*training\.learning_rate: 0\.01 -> 0\.001"):
        run_training(recipe(learning_rate=1e-3), resume=True)
    original = data.read_text()
    data.write_text(original.replace("contract", "agreement", 1))
    with pytest.raises(UserError, match=r"cannot resume .*: the training data changed since the run started"):
        run_training(recipe(), resume=True)
    data.write_text(original)
    with caplog.at_level(logging.WARNING):
        finished = run_training(recipe(logging_steps=2), resume=True)
    assert "resuming at step 2 with changed settings: training.logging_steps: 1 -> 2" in caplog.text
    assert "logging_steps: 2" in finished.run_dir.resolved_recipe.read_text()


def test_crash_during_a_save_leaves_an_incomplete_checkpoint_that_resume_skips(make_recipe, monkeypatch, caplog):
    real_save = torch.save

    def dying_save(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
            raise SimulatedCrash
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    recipe = make_recipe(max_steps=6, save_steps=2)
    with pytest.raises(SimulatedCrash):
        run_training(recipe)
    run = RunDir(recipe.run_dir())
    broken = run.checkpoints / "checkpoint-4"
    assert broken.is_dir() and not (broken / MARKER).exists()
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(run, None).name == "checkpoint-2"
    assert "checkpoint-4: incomplete" in caplog.text
    with pytest.raises(UserError, match=r"cannot resume from .*checkpoint-4: incomplete"):
        resolve_checkpoint(run, str(broken))
    monkeypatch.setattr(torch, "save", real_save)
    finished = run_training(recipe, resume=True)
    assert finished.summary["steps"] == 6 and finished.run_dir.is_finished()


def test_truncated_or_corrupt_checkpoints_are_detected(make_recipe, caplog):
    recipe = make_recipe(max_steps=4, save_steps=2)
    run = run_training(recipe).run_dir
    newest = run.checkpoints / "checkpoint-4"
    weights = newest / "adapter_model.safetensors"
    assert checkpoint_problem(newest) is None
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert checkpoint_problem(newest).startswith("truncated file adapter_model.safetensors")
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert checkpoint_problem(newest) == "corrupt file adapter_model.safetensors (checksum mismatch)"
    with caplog.at_level(logging.WARNING):
        assert latest_valid_checkpoint(run.checkpoints).name == "checkpoint-2"
    assert "corrupt file" in caplog.text


def test_only_the_last_k_complete_checkpoints_are_kept(make_recipe):
    run = run_training(make_recipe(max_steps=6, save_steps=1, save_total_limit=2)).run_dir
    assert sorted(p.name for p in run.checkpoints.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


def test_a_failed_save_is_a_clear_error_and_the_previous_checkpoint_stays(make_recipe, monkeypatch):
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    recipe = make_recipe(max_steps=6, save_steps=2)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint-4: \[Errno 28\] No space left.*checkpoint-2 is intact"):
        run_training(recipe)
    run = RunDir(recipe.run_dir())
    assert not (run.checkpoints / "checkpoint-4").exists()
    assert checkpoint_problem(run.checkpoints / "checkpoint-2") is None
    assert json.loads(run.status.read_text())["state"] == "failed" and not run.is_finished()


def test_a_full_disk_that_also_fails_the_status_write_still_reports_the_real_error(make_recipe, monkeypatch):
    import qlora_pipe.runs as runs

    real_save, real_json = torch.save, runs.write_json_atomic

    def full_disk(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    def status_on_a_full_disk(path, payload):
        if path.name == "status.json" and payload.get("state") != "running":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_json(path, payload)

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(runs, "write_json_atomic", status_on_a_full_disk)
    recipe = make_recipe(max_steps=6, save_steps=2)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint-4: \[Errno 28\]"):  # not the status write's error
        run_training(recipe)
    run = RunDir(recipe.run_dir())
    assert json.loads(run.status.read_text())["state"] == "running"  # the failure could not be recorded...
    assert run.state().startswith("ended without recording why")  # ...and is not mistaken for a live run
    with pytest.raises(UserError, match=r"unfinished run \(status: ended without recording why"):
        run_training(recipe)


def test_a_non_finite_step_is_skipped_without_optimizer_or_scheduler_step(make_recipe):
    nan = NaNAtSteps({3})
    result = run_training(make_recipe(max_steps=6), callbacks=(nan,))
    assert result.summary["skipped_steps"] == 1 and result.summary["steps"] == 6
    assert nan.final == {"optimizer_steps": {5}, "scheduler_steps": 5}
    logged = [row for row in map(json.loads, result.run_dir.metrics.read_text().splitlines()) if "loss" in row]
    assert all(row["loss"] == row["loss"] for row in logged)  # no NaN reaches the logs
    assert [row["skipped_steps"] for row in logged][-1] == 1


def test_too_many_bad_steps_stop_the_run_and_keep_the_last_good_checkpoint(make_recipe):
    recipe = make_recipe(max_steps=10, save_steps=2, max_bad_steps=2)
    with pytest.raises(
        TrainingAborted, match=r"2 consecutive steps .* stopped at step 4; last good checkpoint: .*checkpoint-2"
    ):
        run_training(recipe, callbacks=(NaNAtSteps({3, 4, 5, 6}),))
    run = RunDir(recipe.run_dir())
    assert not run.is_finished() and not run.adapter_weights.exists()
    assert latest_valid_checkpoint(run.checkpoints).name == "checkpoint-2"


def test_resume_of_a_finished_run_is_refused_and_changes_nothing(make_recipe):
    recipe = make_recipe(max_steps=2, save_steps=1)
    run = run_training(recipe).run_dir
    summary, metrics = run.summary.read_bytes(), run.metrics.read_bytes()
    with pytest.raises(UserError, match=r"cannot resume .*: it already finished \(summary.json\)"):
        run_training(recipe, resume=True)
    assert run.summary.read_bytes() == summary and run.metrics.read_bytes() == metrics


def test_resume_command_keeps_the_overrides(tmp_path, tiny_model_dir):
    from qlora_pipe.recipe import load_recipe
    from qlora_pipe.training.resume import resume_command

    path = tmp_path / "my recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, tmp_path / "runs")))
    recipe = load_recipe(path, ["run_name=b", "training.learning_rate=1e-4"])
    command = resume_command(recipe, RunDir(recipe.run_dir()))
    assert command == f"qlora-pipe train '{path}' --set run_name=b --set training.learning_rate=1e-4 --resume"
    from_api = recipe.model_copy(update={"source": None})
    assert resume_command(from_api, RunDir(recipe.run_dir())) == (
        f"qlora-pipe train {tmp_path}/runs/b/recipe.resolved.yaml --resume"
    )
