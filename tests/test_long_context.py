"""Long context: the planner's switches (tiled MLP, activation offloading), how 'auto' settles them, and a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import recipe_dict

from qlora_pipe.cli import main
from qlora_pipe.plan.advice import longest_by_switches, recipe_plan
from qlora_pipe.recipe import load_recipe, validate_recipe

REPO = Path(__file__).resolve().parents[1]
LONG = REPO / "recipes/long-context.yaml"
GIB24 = 24 * 2**30


def _plan(path: Path, sets: list[str], length: int | None, gpu: bool = True, gpus: int = 1):
    recipe = load_recipe(path, ["training.precision=bf16", *sets])
    return recipe_plan(recipe, GIB24, micro_batch_size=1, max_length=length, gpu=gpu, gpus=gpus)


def test_the_plan_fits_80k_tokens_of_llama_3_1_8b_in_24_gib_with_the_switches():
    plan = _plan(LONG, [], 81920)
    assert plan.fits and plan.settings.tiled_mlp and plan.settings.activation_offloading  # 'auto' turned both on
    rows = {row.label: row.longest for row in longest_by_switches(plan.shape, plan.settings, GIB24)}
    assert rows["tiled_mlp + activation_offloading"] >= 81920
    assert rows["neither"] < rows["tiled_mlp"] < rows["tiled_mlp + activation_offloading"]
    assert rows["neither"] < rows["activation_offloading"] < 81920  # neither switch alone reaches it
    plain = _plan(LONG, ["training.tiled_mlp=false", "training.activation_offloading=false"], 81920)
    assert not plain.fits


def test_auto_turns_a_switch_on_only_where_it_pays():
    short = _plan(REPO / "recipes/qa-legal.yaml", [], 1024)
    assert not short.settings.tiled_mlp and not short.settings.activation_offloading  # under 10% of the peak
    long = _plan(REPO / "recipes/qa-legal.yaml", [], 16384)
    assert long.settings.tiled_mlp and long.settings.activation_offloading
    no_gpu = _plan(REPO / "recipes/qa-legal.yaml", [], 16384, gpu=False)
    assert no_gpu.settings.tiled_mlp and not no_gpu.settings.activation_offloading  # offloading needs a GPU
    sharded = _plan(REPO / "recipes/qa-legal.yaml", ["quantization.quant_storage=bfloat16"], 16384, gpus=2)
    assert not sharded.settings.tiled_mlp and not sharded.settings.activation_offloading  # not verified sharded
    forced = _plan(REPO / "recipes/qa-legal.yaml", ["training.tiled_mlp=true"], 1024)
    assert forced.settings.tiled_mlp  # what the recipe sets is kept


def test_offloading_is_planned_with_its_host_memory_and_max_length_auto_stays_within_it():
    from qlora_pipe.plan.layer_bytes import offloaded_host_bytes

    plan = _plan(LONG, [], 131072)
    assert offloaded_host_bytes(plan.shape, plan.settings) == 2 * 4096 * 32 * 131072  # bf16 inputs of 32 layers
    recipe = load_recipe(LONG, ["training.precision=bf16"])
    free = recipe_plan(recipe, GIB24)
    held = recipe_plan(recipe, GIB24, host_budget=16 * 2**30)
    assert free.settings.max_length == 131072  # the model's positions
    assert (
        offloaded_host_bytes(held.shape, held.settings) <= 16 * 2**30 < offloaded_host_bytes(free.shape, free.settings)
    )


def test_plan_prints_the_longest_sequence_for_each_switch(capsys):
    assert main(["plan", str(LONG), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    longest = report["longest_by_switches"]
    assert list(longest) == ["neither", "tiled_mlp", "activation_offloading", "tiled_mlp + activation_offloading"]
    assert report["tiled_mlp"] and report["activation_offloading"] and report["offloaded_host_bytes"] > 0
    assert main(["plan", str(LONG)]) == 0
    out = capsys.readouterr().out
    assert "longest sequence at micro batch 1 in 24.00 GiB, by switch:" in out and "host memory" in out


def test_tiled_mlp_true_is_refused_under_a_sharded_launch():
    from qlora_pipe.machine.shard_rules import sharded_refusals

    recipe = load_recipe(REPO / "recipes/qa-legal.yaml", ["training.tiled_mlp=true"])
    assert "training.tiled_mlp" in dict(sharded_refusals(recipe, "fsdp"))
    auto = load_recipe(REPO / "recipes/qa-legal.yaml")
    assert "training.tiled_mlp" not in dict(sharded_refusals(auto, "fsdp"))


def test_loss_tile_is_set_and_restored():
    from trl.kernels import chunked_logprob

    from qlora_pipe.compat.trl import loss_token_tile

    before = chunked_logprob.TOKEN_CHUNK_SIZE
    with loss_token_tile(128):
        assert chunked_logprob.TOKEN_CHUNK_SIZE == 128
    assert chunked_logprob.TOKEN_CHUNK_SIZE == before == 4096


def test_a_run_records_the_settled_switches_and_trains_with_the_tiled_mlp(
    tiny_model_dir, tmp_path, caplog, monkeypatch
):
    """A real run: 'auto' settled and written into recipe.resolved.yaml (offloading off without a GPU); with
    tiled_mlp true (in tiles of 32 tokens here) the layers' MLPs run tiled through TRL's trainer and every
    step's loss is the untiled run's."""
    import logging

    from qlora_pipe.models import tiled_mlp
    from qlora_pipe.training.stage import run_training

    monkeypatch.setattr(tiled_mlp, "TILE_TOKENS", 32)

    losses = {}
    for tiled in ("auto", True):
        raw = recipe_dict(tiny_model_dir, tmp_path / str(tiled), max_steps=3, tiled_mlp=tiled)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            result = run_training(validate_recipe(raw))
        resolved = yaml.safe_load(result.run_dir.resolved_recipe.read_text())["training"]
        assert resolved["activation_offloading"] is False
        assert resolved["tiled_mlp"] is (tiled is True)  # 256 tokens: tiling would save under 10%
        assert ("tiled MLP:" in caplog.text) is (tiled is True)
        rows = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines()]
        losses[tiled] = [row["loss"] for row in rows if "loss" in row]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses["auto"], rel=1e-4)


def test_auto_leaves_the_tiled_mlp_off_where_the_layers_have_no_mlp_to_tile():
    from dataclasses import replace

    from qlora_pipe.plan.long_context import settle_switches, tileable
    from qlora_pipe.plan.shapes import Linear

    plan = _plan(LONG, [], 81920)
    assert tileable(plan.shape) and plan.settings.tiled_mlp
    gpt2_names = [replace(lin, name=lin.name.replace("model.layers.", "transformer.h.")) for lin in plan.shape.linears]
    gpt2 = replace(plan.shape, linears=gpt2_names)
    assert not tileable(gpt2) and isinstance(gpt2_names[0], Linear)
    settled = settle_switches(gpt2, plan.settings, ["tiled_mlp", "activation_offloading"], GIB24)
    assert not settled.tiled_mlp and settled.activation_offloading
