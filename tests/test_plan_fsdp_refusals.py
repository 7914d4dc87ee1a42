"""`plan --gpus N` plans an FSDP launch of the recipe: it refuses a method no FSDP launch runs (as `train`
refuses it when so launched) and names what else such a launch refuses as the recipe stands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_pipe.cli import main
from qlora_pipe.errors import UserError
from qlora_pipe.models.loading import check_sharded_quantization
from qlora_pipe.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
BUNDLED = "model.name_or_path=meta-llama/Llama-3.1-8B"  # a bundled config: plans offline
GRPO = [str(REPO / "recipes/quickstart-grpo.yaml"), "--set", BUNDLED]
SFT = [str(REPO / "recipes/qa-legal.yaml"), "--set", BUNDLED]
BF16_STORAGE = ["--set", "quantization.quant_storage=bfloat16"]
REFUSES = "an FSDP launch refuses this recipe as it stands: "


def test_grpo_is_refused_per_gpu_as_train_refuses_it_under_fsdp(capsys, monkeypatch):
    assert main(["plan", *GRPO, "--gpus", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no plan of a launch that cannot start
    assert captured.err.count("\n") == 1 and captured.err.startswith(
        "error: plan --gpus 2: method: grpo under a fsdp launch is not supported"
    ), captured.err
    assert main(["plan", *GRPO]) == 0  # DDP: each process holds the model, as one GPU does
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    storage = ["quantization.compute_dtype=bfloat16", "quantization.quant_storage=bfloat16"]
    with pytest.raises(UserError, match="method: grpo under a fsdp launch is not supported"):  # the same rule
        check_sharded_quantization(load_recipe(GRPO[0], [BUNDLED, *storage]))


def test_what_else_an_fsdp_launch_refuses_is_named_with_the_plan(capsys):
    assert main(["plan", *SFT, "--gpus", "2"]) == 0  # quant_storage uint8: planned as the launch needs it
    out = capsys.readouterr().out
    assert "total (predicted peak)" in out
    assert out.count(REFUSES) == 1 and f"{REFUSES}quantization.quant_storage: fsdp with 4-bit weights" in out
    changed = [*SFT, *BF16_STORAGE, "--set", "hub.repo_id=me/x", "--set", "hub.push_checkpoints=true"]
    assert main(["plan", *changed, "--gpus", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r.split(":")[0] for r in report["fsdp_refuses"]] == ["hub.push_checkpoints"]
    # micro_batch_size auto is refused by a sharded launch, but answered by the plan (the number that fits).
    assert main(["plan", *SFT, *BF16_STORAGE, "--set", "training.micro_batch_size=auto", "--gpus", "2"]) == 0
    assert REFUSES not in capsys.readouterr().out
    assert main(["plan", *SFT]) == 0 and REFUSES not in capsys.readouterr().out  # one GPU: nothing to refuse
