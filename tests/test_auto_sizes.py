"""`data.max_length: auto` and `training.micro_batch_size: auto`: sizes from the memory planner, resolved once
per run, and a real training run with them."""

from __future__ import annotations

import json

from qlora_pipe.plan.advice import largest_micro_batch, longest_sequence, parse_size, recipe_plan
from qlora_pipe.recipe import validate_recipe
from tests.conftest import plan_recipe, recipe_dict


def test_auto_sizes_start_from_the_plan(family_dirs, tmp_path):
    from qlora_pipe.plan.auto_sizes import micro_batch_start, resolve_max_length

    recipe = plan_recipe(family_dirs["llama"], tmp_path, micro_batch_size="auto")
    auto = recipe.model_copy(update={"data": recipe.data.model_copy(update={"max_length": "auto"})})
    assert resolve_max_length(auto, None).data.max_length == 1024  # no budget: 2048 capped by the positions
    budget = recipe_plan(recipe, None, micro_batch_size=1, max_length=512).total
    resolved = resolve_max_length(auto, budget).data.max_length
    assert resolved == longest_sequence(*_shape_settings(recipe, 1, 512), budget)
    assert 64 <= resolved <= 512 + 64
    start = micro_batch_start(recipe, budget)
    assert start == largest_micro_batch(*_shape_settings(recipe, 1, 256), budget) and start >= 1


def test_auto_sizes_are_resolved_once_per_run(family_dirs, tmp_path, monkeypatch):
    """Both sizes auto: the budget is read once and the meta-device model built once, and the result is the
    same as resolving each size on its own."""
    import qlora_pipe.plan.advice as advice
    import qlora_pipe.plan.auto_sizes as auto_sizes

    recipe = plan_recipe(family_dirs["llama"], tmp_path, micro_batch_size="auto")
    budget = recipe_plan(recipe, None, micro_batch_size=1, max_length=512).total
    auto = recipe.model_copy(update={"data": recipe.data.model_copy(update={"max_length": "auto"})})
    expected_length = auto_sizes.resolve_max_length(auto, budget).data.max_length
    expected_start = auto_sizes.micro_batch_start(
        auto.model_copy(update={"data": auto.data.model_copy(update={"max_length": expected_length})}), budget
    )
    calls = {"shape": 0, "budget": 0}
    real_shape = advice.shape_from_config

    def counted_shape(config):
        calls["shape"] += 1
        return real_shape(config)

    def counted_budget(r):
        calls["budget"] += 1
        return budget

    monkeypatch.setattr(advice, "shape_from_config", counted_shape)
    monkeypatch.setattr(auto_sizes, "memory_budget", counted_budget)
    sizes = auto_sizes.resolve_auto_sizes(auto)
    assert calls == {"shape": 1, "budget": 1}
    assert (sizes.recipe.data.max_length, sizes.micro_batch_start) == (expected_length, expected_start)


def _shape_settings(recipe, batch, length):
    plan = recipe_plan(recipe, None, micro_batch_size=batch, max_length=length)
    return plan.shape, plan.settings


def test_training_with_auto_sizes(tiny_model_dir, tmp_path):
    import yaml

    from qlora_pipe.machine.hardware import detect_hardware, resolve_recipe_precision
    from qlora_pipe.plan.auto_sizes import micro_batch_start
    from qlora_pipe.training.stage import run_training

    raw = recipe_dict(tiny_model_dir, tmp_path / "runs", max_steps=1, micro_batch_size="auto")
    raw["data"]["max_length"] = "auto"
    raw["training"]["memory_budget"] = "600MiB"  # the planner's 0.5 GiB CUDA context + ~90 MiB
    recipe = validate_recipe(raw)
    # The run plans with the dtype it resolves here (bf16 on a CPU with native bf16, else fp32).
    resolved_dtypes, _ = resolve_recipe_precision(recipe, detect_hardware("cpu"))
    planned = recipe_plan(resolved_dtypes, parse_size("600MiB"), micro_batch_size=1)
    result = run_training(recipe)
    resolved = yaml.safe_load(result.run_dir.resolved_recipe.read_text())
    assert resolved["data"]["max_length"] == planned.settings.max_length
    with_length = resolved_dtypes.model_copy(
        update={"data": resolved_dtypes.data.model_copy(update={"max_length": planned.settings.max_length})}
    )
    choice = json.loads((result.run_dir.root / "auto_batch.json").read_text())
    assert choice["micro_batch_size"] == micro_batch_start(with_length, parse_size("600MiB"))  # CPU never OOMs


def test_auto_sizes_and_advice_for_preference_runs(family_dirs, tiny_model_dir, tmp_path):
    """DPO puts chosen and rejected through the model together and keeps a reference adapter: on the same
    budget its auto sizes are smaller than SFT's, advice names DPO's own limits, and a real DPO run trains at
    the sizes the plan chose."""
    import yaml

    from qlora_pipe.machine.hardware import detect_hardware, resolve_recipe_precision
    from qlora_pipe.plan.advice import advise
    from qlora_pipe.training.stage import run_training
    from tests.helpers.recipes import PAIRS_TRAIN

    sft = plan_recipe(family_dirs["llama"], tmp_path, micro_batch_size="auto")
    dpo = sft.model_copy(update={"method": "dpo"})
    budget = recipe_plan(sft, None, micro_batch_size=4, max_length=512).total
    sft_plan, dpo_plan = recipe_plan(sft, budget, max_length=512), recipe_plan(dpo, budget, max_length=512)
    # twice the rows per pair: about half the micro batch (the fixed terms stay)
    assert 1 <= dpo_plan.settings.micro_batch_size <= sft_plan.settings.micro_batch_size // 2 + 1
    assert dpo_plan.settings.micro_batch_size == largest_micro_batch(dpo_plan.shape, dpo_plan.settings, budget)
    over = recipe_plan(dpo, budget, micro_batch_size=sft_plan.settings.micro_batch_size, max_length=512)
    assert not over.fits  # SFT's batch does not fit a DPO step on the same budget
    advice = advise(over)
    assert advice.max_micro_batch == dpo_plan.settings.micro_batch_size
    assert advice.max_length < 512 and advice.best_switch is not None

    raw = recipe_dict(tiny_model_dir, tmp_path / "runs", max_steps=1, micro_batch_size="auto")
    raw.update(run_name="dpo-auto", method="dpo", preference={"beta": 0.1})
    raw["data"].update(train_path=str(PAIRS_TRAIN), eval_path=None, max_length="auto", max_train_samples=16)
    raw["training"]["memory_budget"] = "600MiB"
    recipe = validate_recipe(raw)
    resolved_dtypes, _ = resolve_recipe_precision(recipe, detect_hardware("cpu"))
    planned = recipe_plan(resolved_dtypes, parse_size("600MiB"), micro_batch_size=1)
    sft_planned = recipe_plan(resolved_dtypes.model_copy(update={"method": "sft"}), parse_size("600MiB"), None, 1)
    assert planned.settings.max_length < sft_planned.settings.max_length
    result = run_training(recipe)
    resolved = yaml.safe_load(result.run_dir.resolved_recipe.read_text())
    assert resolved["data"]["max_length"] == planned.settings.max_length
    choice = json.loads((result.run_dir.root / "auto_batch.json").read_text())
    assert choice["micro_batch_size"] >= 1 and result.summary["method"] == "dpo"
