"""Training stage: real SFT steps on a real 4-bit tiny model, and the run directory it leaves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from qlora_pipe.recipe import Recipe
from qlora_pipe.runs import RunDir
from qlora_pipe.training.stage import run_training
from tests.conftest import recipe_dict

REPO = Path(__file__).resolve().parents[1]


def train_losses(run: RunDir) -> list[float]:
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def test_training_lowers_loss_and_writes_a_complete_run(make_recipe):
    recipe = make_recipe(max_steps=8, eval_steps=4, save_steps=4, save_total_limit=1)
    result = run_training(recipe)
    run = result.run_dir
    summary = json.loads(run.summary.read_text())
    assert summary["final_eval_loss"] < summary["eval_loss_before"]
    losses = train_losses(run)
    assert len(losses) == 8 and losses[-1] < losses[0]
    # What the run directory must hold.
    assert run.is_finished()
    assert run.adapter_weights.is_file() and run.adapter_config.is_file()
    # The tokenizer and the exact chat template of training are saved with the adapter.
    saved = AutoTokenizer.from_pretrained(run.root)
    original = AutoTokenizer.from_pretrained(recipe.model.name_or_path)
    assert saved.chat_template == original.chat_template and "generation" in saved.chat_template
    assert saved.pad_token_id != saved.eos_token_id
    resolved = Recipe.model_validate(yaml.safe_load(run.resolved_recipe.read_text()))
    assert resolved.training.max_steps == 8 and resolved.lora.r == recipe.lora.r
    assert json.loads(run.status.read_text())["state"] == "finished"
    for key in ("final_train_loss", "supervised_tokens", "wall_seconds", "supervised_tokens_per_second"):
        assert summary[key] is not None
    assert summary["supervised_tokens"] > 0 and summary["peak_memory_bytes"] > 0
    assert set(summary["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes", "trl"}
    assert not list(run.root.glob(".*.tmp")) and not (run.root / ".adapter.tmp").exists()
    # Seeing the run: loss curves, TensorBoard events, best eval tracking.
    assert run.loss_curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and summary["loss_curve"] == "loss.png"
    assert list(run.tensorboard.rglob("events.out.tfevents.*"))
    evals = [json.loads(x) for x in run.metrics.read_text().splitlines() if "eval_loss" in x]
    assert [e["step"] for e in evals] == [0, 4, 8, 8]  # before training, eval_steps, after training
    best = min(evals, key=lambda e: e["eval_loss"])
    assert (summary["best_eval_loss"], summary["best_eval_step"]) == (best["eval_loss"], best["step"])
    assert (run.checkpoints / f"checkpoint-{best['step']}").is_dir()  # the best checkpoint survives rotation


def test_same_seed_gives_same_losses(make_recipe):
    first = run_training(make_recipe(max_steps=4))
    second_recipe = make_recipe(max_steps=4)
    second_recipe.run_name = "test-again"
    second = run_training(second_recipe)
    assert train_losses(first.run_dir) == train_losses(second.run_dir)


def test_adapter_reloads_onto_fresh_4bit_base_with_same_logits(make_recipe):
    from qlora_pipe.models.loading import load_trained_model

    recipe = make_recipe(max_steps=4)
    result = run_training(recipe)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])
    trained = result.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    fresh = load_trained_model(recipe, result.run_dir.root)
    with torch.no_grad():
        reloaded = fresh(input_ids=ids).logits
    assert torch.equal(expected, reloaded)
    # The adapter learned something: it differs from the bare base.
    with torch.no_grad(), fresh.disable_adapter():
        base = fresh(input_ids=ids).logits
    assert not torch.allclose(base, reloaded)


def test_existing_run_is_not_clobbered(make_recipe):
    from qlora_pipe.errors import UserError

    recipe = make_recipe(max_steps=1)
    run_training(recipe)
    with pytest.raises(UserError, match="already holds a finished run"):
        run_training(recipe)


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(make_recipe):
    """--overwrite replaces only run directories qlora-pipe made: a user's folder in the way is refused, intact."""
    from qlora_pipe.errors import UserError

    recipe = make_recipe(max_steps=1)
    folder = recipe.run_dir()
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "sub" / "data.csv").write_text("a,b")
    with pytest.raises(UserError, match=r"is not a qlora-pipe run directory; --overwrite replaces only run"):
        run_training(recipe, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "sub" / "data.csv").read_text() == "a,b"
    (folder / "notes.txt").unlink()
    (folder / "sub" / "data.csv").unlink()
    (folder / "sub").rmdir()
    first = run_training(recipe)  # an empty folder is fine; the run marks it as its own
    assert (first.run_dir.root / ".qlora-pipe-run").is_file()
    assert run_training(recipe, overwrite=True).run_dir.is_finished()  # and --overwrite may then replace it


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlora_pipe.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # a relative path is resolved when the recipe is loaded, and named as resolved
        ({"data": {"train_path": "missing/train.jsonl"}}, r"data file not found: /\S*/missing/train\.jsonl$"),
        ({"lora": {"target_modules": ["qkv"]}}, r"lora\.target_modules: qkv match no linear layer"),
        ({"model": {"name_or_path": "./no/such/model"}}, r"model\.name_or_path: directory not found"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_leaves_no_run(tiny_model_dir, tmp_path, change, message):
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs")
    for section, values in change.items():
        raw[section].update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = cli("train", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), last
    assert "Traceback" not in result.stderr
    run = RunDir(tmp_path / "runs" / "test")
    assert not run.is_finished()
    assert not run.root.exists() or not any(run.root.iterdir())


def test_malformed_data_line_is_named(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json}\n')
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs")
    raw["data"]["train_path"] = str(bad)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = cli("train", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{bad}:2: invalid JSON" in result.stderr


def test_python_api_takes_a_recipe_path_with_overrides(tiny_model_dir, tmp_path):
    import qlora_pipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, tmp_path / "runs")))
    result = qlora_pipe.train(str(path), overrides=["training.max_steps=2", "run_name=api"])
    assert result.summary["steps"] == 2 and result.run_dir.root == tmp_path / "runs" / "api"
    assert result.model is not None and result.tokenizer is not None
