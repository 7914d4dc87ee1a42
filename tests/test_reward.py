"""method: reward on the same pipeline: a reward model (4-bit base, LoRA and a scalar head) trained by TRL's
RewardTrainer on the bundled preference pairs, scored before and after, exported merged and verified, reloaded
by plain transformers as a sequence classifier that ranks the pairs as the trained model does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import load_recipe, validate_recipe
from tests.conftest import recipe_dict
from tests.helpers.recipes import PAIRS_TRAIN


def reward_recipe(model_dir: Path, tmp_path: Path, **training) -> dict:
    raw = recipe_dict(model_dir, tmp_path / "runs", **{"max_steps": 40, "learning_rate": 5e-3, **training})
    raw.update(run_name="reward", method="reward")
    raw["data"].update(train_path=str(PAIRS_TRAIN), eval_path=str(PAIRS_TRAIN))
    raw["data"].update(max_train_samples=16, max_eval_samples=16)
    return raw


def test_a_reward_recipe_refuses_what_a_reward_model_does_not_do(tmp_path):
    raw = reward_recipe(Path("m"), tmp_path)
    raw["training"]["preview_prompts"] = ["What is a lien?"]
    with pytest.raises(UserError, match=r"training\.preview_prompts: a reward model does not generate"):
        validate_recipe(raw)
    raw = reward_recipe(Path("m"), tmp_path)
    raw["model"]["adapter"] = "runs/quickstart"
    with pytest.raises(UserError, match=r"model\.adapter: a reward model starts from a fresh adapter and head"):
        validate_recipe(raw)
    raw = reward_recipe(Path("m"), tmp_path)
    raw["reward"] = {"center_rewards_coefficient": -1}
    with pytest.raises(UserError, match=r"reward\.center_rewards_coefficient"):
        validate_recipe(raw)


def test_a_reward_model_trains_exports_and_reloads_as_a_sequence_classifier(tiny_model_dir, tmp_path, capsys, caplog):
    """The 16 pairs it trains on are also the ones scored (on the random tiny model a held-out gain would be
    chance): the chosen answer must end up above the rejected one, through training, the merged export and
    plain transformers alike."""
    from transformers import AutoModelForSequenceClassification

    from qlora_pipe.cli import main
    from qlora_pipe.evaluate.preference_eval import pairs_for
    from qlora_pipe.export.command import export_merged
    from qlora_pipe.methods.reward import pair_rewards, pairwise_scores
    from qlora_pipe.models.loading import load_run_tokenizer
    from qlora_pipe.publish.model_card import adapter_card
    from qlora_pipe.training.stage import run_training

    result = run_training(validate_recipe(reward_recipe(tiny_model_dir, tmp_path)))
    summary = result.summary
    assert "LOAD REPORT" not in caplog.text  # the expected keys (LM head left out, new head) are not reported
    assert summary["method"] == "reward" and summary["reward"] == {"center_rewards_coefficient": None}
    before, after = summary["held_out_pairwise_accuracy"]["before"], summary["held_out_pairwise_accuracy"]["after"]
    assert before["pairs"] == after["pairs"] == 16
    assert after["pairwise_accuracy"] == 1.0 and after["mean_margin"] > before["mean_margin"] + 1
    assert summary["final_eval_loss"] == pytest.approx(after["pairwise_loss"], rel=1e-3)  # TRL's eval loss, ours
    assert summary["eval_loss_before"] == pytest.approx(before["pairwise_loss"], rel=1e-3)
    assert summary["supervised_tokens"] == 40 * 4 * 2  # one score per sequence, chosen and rejected
    rows = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines()]
    assert any("accuracy" in row and "margin" in row for row in rows)  # TRL's reward metrics are recorded

    exported = export_merged(result.run_dir.root)
    assert exported.fidelity["passed"] and exported.fidelity["examples"] == 16
    assert exported.fidelity["top1_agreement"] == 1.0  # every pair ordered the same way
    merged = result.run_dir.root / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["id2label"] == {"0": "reward"}
    plain = AutoModelForSequenceClassification.from_pretrained(merged, dtype=torch.float32).eval()
    assert plain.config.num_labels == 1 and plain.score.weight.shape[0] == 1
    tokenizer = load_run_tokenizer(result.run_dir.root)
    recipe = load_recipe(result.run_dir.resolved_recipe)
    pairs = pairs_for(recipe, tokenizer, None, None)[0]
    assert pairwise_scores(*pair_rewards(plain, tokenizer, pairs))["pairwise_accuracy"] == 1.0

    capsys.readouterr()
    assert main(["eval", str(result.run_dir.root)]) == 0
    printed = capsys.readouterr().out
    assert "pairwise accuracy" in printed and "base (untrained head)" in printed
    report = json.loads(result.run_dir.eval_report.read_text())
    assert report["columns"]["reward model"] == after  # the same pairs, the same model: the same scores
    base = report["columns"]["base (untrained head)"]  # the head as loaded; training began from its bf16 copy
    assert base["pairwise_accuracy"] == before["pairwise_accuracy"]
    assert base["pairwise_loss"] == pytest.approx(before["pairwise_loss"], rel=1e-3)
    assert main(["eval", str(result.run_dir.root), "--merged"]) == 0
    merged_report = json.loads((merged / "eval.json").read_text())
    assert merged_report["columns"]["reward model"]["pairwise_accuracy"] == 1.0

    card = adapter_card(result.run_dir, recipe, "me/reward")
    assert "reward model" in card and "AutoModelForSequenceClassification" in card and "num_labels=1" in card
    assert main(["chat", str(result.run_dir.root), "--prompt", "hello"]) == 2
    assert "is a reward model" in capsys.readouterr().err
    assert main(["export", str(result.run_dir.root), "--format", "gguf"]) == 2
    assert "llama.cpp serves language models, not a reward model's" in capsys.readouterr().err
    assert (merged / "fidelity.json").is_file()  # the verified export is left as it was


def test_plan_and_preview_of_a_reward_recipe(tiny_model_dir, tmp_path, capsys):
    import yaml

    from qlora_pipe.cli import main

    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(reward_recipe(tiny_model_dir, tmp_path)))
    assert main(["plan", str(path)]) == 0
    assert "method reward: planned as a causal LM" in capsys.readouterr().out
    assert main(["data", str(path), "--preview", "1"]) == 0
    assert "rejected" in capsys.readouterr().out
