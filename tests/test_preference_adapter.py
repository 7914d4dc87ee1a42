"""A preference run that continues an adapter (model.adapter): an SFT adapter on its own base, scored beside the
base by `qlora-pipe eval`, and the adapters it refuses in one line before any model loads (another base, a run
missing, damaged or unfinished, a classifier's adapter)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import validate_recipe
from tests.helpers.recipes import dpo_recipe


def test_dpo_continues_an_sft_adapter_on_its_own_base(make_recipe, tiny_model_dir, tmp_path):
    from qlora_pipe.training.method import starting_adapter
    from qlora_pipe.training.stage import run_training

    sft = run_training(make_recipe(max_steps=2))
    raw = dpo_recipe(tiny_model_dir, tmp_path, "continued", max_steps=2, eval_steps=None)
    raw["model"]["adapter"] = str(sft.run_dir.root)
    raw["lora"]["r"] = 4  # ignored: the continued adapter keeps its own rank
    result = run_training(validate_recipe(raw))
    assert result.summary["trainable_params"] == sft.summary["trainable_params"]
    assert result.summary["started_from_adapter"] == str(sft.run_dir.root)
    from qlora_pipe.cli import main

    assert main(["eval", str(result.run_dir.root), "--limit", "4"]) == 0  # base, the SFT adapter, the DPO one
    assert set(json.loads(result.run_dir.eval_report.read_text())["columns"]) == {"base", "sft", "dpo"}
    raw["model"]["name_or_path"] = str(tmp_path)  # another base
    with pytest.raises(UserError, match=r"model\.adapter: .* was trained on .*, not on model\.name_or_path"):
        starting_adapter(validate_recipe(raw))
    raw["model"]["adapter"] = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"model\.adapter: .*nowhere does not exist"):
        starting_adapter(validate_recipe(raw))

    # The SFT run deleted: eval scores what it can (base and the DPO adapter) and says what is missing.
    shutil.rmtree(sft.run_dir.root)
    assert main(["eval", str(result.run_dir.root), "--limit", "4"]) == 0
    report = json.loads(result.run_dir.eval_report.read_text())
    assert set(report["columns"]) == {"base", "dpo"}
    assert "adapter_config.json is missing" in report["left_out"]["sft"]


def damaged_runs(run: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Copies of a finished run, each damaged one way a user meets: (folder, what the refusal names)."""
    from tests.helpers.damage import truncate

    cases = {
        "no weights": (lambda r: (r / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
        "truncated weights": (lambda r: truncate(r / "adapter_model.safetensors"), "adapter_model.safetensors"),
        "unfinished": (lambda r: (r / "summary.json").unlink(), "is not a finished run"),
    }
    out = {}
    for name, (damage, expected) in cases.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(run, copy)
        damage(copy)
        out[name] = copy, expected
    return out


def test_model_adapter_refuses_what_export_refuses(make_recipe, tiny_model_dir, tmp_path):
    """model.adapter naming a run export, eval and chat would refuse (adapter missing or truncated, the run
    unfinished) or a classifier's run is refused in one line before any model loads; `train` exits 2."""
    from qlora_pipe.training.method import starting_adapter
    from qlora_pipe.training.stage import run_training
    from tests.helpers.cli import assert_one_line_error, cli
    from tests.helpers.recipes import classifier_recipe

    sft = run_training(make_recipe(max_steps=1))
    raw = dpo_recipe(tiny_model_dir, tmp_path, "continued", max_steps=1)
    raw["model"]["adapter"] = str(sft.run_dir.root)
    assert starting_adapter(validate_recipe(raw)) == sft.run_dir.root
    for name, (folder, expected) in damaged_runs(sft.run_dir.root, tmp_path).items():
        raw["model"]["adapter"] = str(folder)
        with pytest.raises(UserError, match=rf"^model\.adapter: .*{re.escape(expected)}[^\n]*$"):
            starting_adapter(validate_recipe(raw))
        if name == "truncated weights":  # the whole command: one line, exit 2, no run folder
            import yaml

            (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(raw))
            assert_one_line_error(cli("train", str(tmp_path / "dpo.yaml")), "model.adapter", expected)
            assert not (tmp_path / "runs" / "continued").exists()

    (tmp_path / "cls").mkdir()
    classifier = run_training(classifier_recipe(tiny_model_dir, tmp_path / "cls", "classifier", max_steps=1))
    raw["model"]["adapter"] = str(classifier.run_dir.root)
    with pytest.raises(UserError, match=r"holds a classifier's adapter; method dpo continues a text-generation"):
        starting_adapter(validate_recipe(raw))
