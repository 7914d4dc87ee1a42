"""A run works from any directory: the relative paths of a recipe (base model folder, data files, cache, reward
files and modules) are resolved when it is loaded and recorded absolute in recipe.resolved.yaml; export needs
no reward code (the run recorded the columns each reward reads), and a run it cannot verify is refused before
the merge, leaving nothing behind."""

from __future__ import annotations

import json
import shutil

import yaml

from tests.helpers.recipes import FORMAT, PROMPTS_EVAL, PROMPTS_TRAIN, USER_REWARDS, grpo_recipe


def test_a_grpo_run_trained_with_relative_paths_exports_and_evaluates_from_elsewhere(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from qlora_pipe.cli import main

    work = tmp_path / "project"
    (work / "data").mkdir(parents=True)
    shutil.copy(PROMPTS_TRAIN, work / "data" / "train.jsonl")
    shutil.copy(PROMPTS_EVAL, work / "data" / "eval.jsonl")
    (work / "base").symlink_to(tiny_model_dir)
    (work / "my_rewards.py").write_text(USER_REWARDS)
    rewards = [{"function": "regex", "pattern": FORMAT, "name": "format"}]
    rewards += [{"function": "my_rewards.py:mentions_area"}, {"function": "my_rewards:letters"}]
    raw = grpo_recipe(tiny_model_dir, tmp_path, "moved", rewards=rewards, max_steps=1)
    raw.update(output_dir="runs")
    raw["model"]["name_or_path"] = "base"
    raw["data"].update(train_path="data/train.jsonl", eval_path="data/eval.jsonl", cache_dir="cache")
    (work / "recipe.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(work)
    assert main(["train", "recipe.yaml"]) == 0
    run = work / "runs" / "moved"
    recorded = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    assert recorded["model"]["name_or_path"] == str(work / "base")
    assert recorded["data"]["train_path"] == str(work / "data" / "train.jsonl")
    assert recorded["data"]["eval_path"] == str(work / "data" / "eval.jsonl")
    assert recorded["data"]["cache_dir"] == str(work / "cache")
    functions = [r["function"] for r in recorded["grpo"]["rewards"]]
    assert functions == ["regex", f"{work / 'my_rewards.py'}:mentions_area", f"{work / 'my_rewards.py'}:letters"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # A run recorded with a relative path (as runs were before paths were resolved): refused before the merge.
    resolved = run / "recipe.resolved.yaml"
    kept = resolved.read_text()
    resolved.write_text(kept.replace(str(work / "data" / "eval.jsonl"), "data/eval.jsonl"))
    capsys.readouterr()
    assert main(["export", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "data/eval.jsonl" in err[-1] and not any("merg" in line.lower() for line in err[:-1])
    assert not (run / "merged").exists() and not (run / "merged.partial").exists()
    resolved.write_text(kept)
    (work / "my_rewards.py").rename(work / "moved_away.py")  # export needs no reward code
    assert main(["export", str(run)]) == 0
    assert (run / "merged" / "model.safetensors").is_file() and not (run / "merged.partial").exists()
    assert json.loads((run / "merged" / "fidelity.json").read_text())["passed"]
    (work / "moved_away.py").rename(work / "my_rewards.py")
    assert main(["eval", str(run)]) == 0  # eval scores the rewards: their files found from anywhere
    assert set(json.loads((run / "eval.json").read_text())["columns"]["grpo"]["rewards"]) == {
        "format",
        "mentions_area",
        "letters",
    }
