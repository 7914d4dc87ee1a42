"""The memory planner: every term against hand-computed values and against real 4-bit models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qlora_pipe.cli import main
from qlora_pipe.errors import UserError
from qlora_pipe.plan.advice import advise, largest_micro_batch, longest_sequence, parse_size, recipe_plan
from qlora_pipe.plan.measure import measure_weight_bytes
from qlora_pipe.plan.shapes import read_config, shape_from_config
from qlora_pipe.plan.terms import (
    PlanSettings,
    layer_saved_bytes_per_token,
    layer_transient_bytes,
    loss_bytes,
    nf4_tensor_bytes,
    optimizer_bytes_per_param,
    plan_memory,
)
from qlora_pipe.recipe import validate_recipe
from tests.conftest import FAMILIES, plan_recipe, recipe_dict, save_random_llama
from tests.helpers.memory import step_peak

REPO = Path(__file__).resolve().parents[1]


def test_nf4_bytes_by_hand():
    # 65,536 weights: 32,768 packed bytes; 1,024 blocks of 64.
    assert nf4_tensor_bytes(65536, double_quant=False) == 32768 + 1024 * 4 + 64
    # Double quant: uint8 absmax, 4 nested fp32 absmax, a 256-entry fp32 code book and an offset.
    assert nf4_tensor_bytes(65536, double_quant=True) == 32768 + 1024 + (4 * 4 + 1024 + 4) + 64


def test_optimizer_state_bytes_by_hand():
    assert optimizer_bytes_per_param("adamw_torch", 2) == 4
    assert optimizer_bytes_per_param("adamw_torch", 4) == 8
    assert optimizer_bytes_per_param("paged_adamw_32bit", 2) == 8
    assert optimizer_bytes_per_param("paged_adamw_8bit", 2) == pytest.approx(2 + 8 / 256)
    assert optimizer_bytes_per_param("sgd", 4) == 0


def test_terms_of_a_tiny_config_by_hand(family_dirs):
    shape = shape_from_config(read_config(str(family_dirs["llama"])))
    # Per layer: q, o 256x256; k, v 256x128; gate, up, down 256x768.
    assert shape.quantized_params == 2 * (2 * 65536 + 2 * 32768 + 3 * 196608)
    assert shape.other_params == 2 * 640 * 256 + 2 * 2 * 256 + 256  # embed, lm_head, 2 norms per layer, final
    s = PlanSettings(micro_batch_size=2, max_length=100, lora_r=8, optimizer="adamw_torch", lora_dropout=0.0)
    plan = plan_memory(shape, s)
    lora = 2 * 8 * ((256 + 256) * 2 + (256 + 128) * 2 + (256 + 768) * 3)
    assert plan.trainable_params == lora
    assert plan.term("LoRA weights") == lora * 2  # bf16 adapter of a 4-bit model trained in bf16
    assert plan.term("optimizer states") == lora * 4
    assert plan.term("base weights, not quantized") == shape.other_params * 2  # bf16, not upcast
    assert plan.term("activations kept") == (2 * 2 + 4) * 256 * 200  # bf16 inputs of 2 layers + final norm fp32
    # One layer's saved tensors per token: the bf16 MLP gate, up and activation (3 x 2 I), fp32 norm inputs
    # (8 H) and 1/rms, attention q/out/k/v (bf16) and lse (fp32), the adapters' bf16 inputs, one per tensor
    # read (q/k/v's, o's, gate/up's, down's), bf16 rank-8 intermediates of 7 adapters; x1.6 in backward.
    layer = 3 * 2 * 768 + 8 * 256 + 8 + 2 * (2 * 4 + 2 * 2) * 64 + 4 * 4 + 2 * (256 + 256 + 256 + 768) + 2 * 8 * 7
    assert layer_saved_bytes_per_token(shape, s) == layer
    # x (recomputed) + the MLP's gradients, 1.5 intermediates, while the layer runs backward
    assert plan.term("transient peak") == max(layer * 200 + 3 * 2 * 768 * 200 // 2, loss_bytes(shape, 200))
    # The loss (TRL's fused LM head) by hand: bf16 hidden copy + fp32 gradient, one bf16 tile (full width).
    qwen = shape_from_config(read_config("Qwen/Qwen2.5-7B"))
    assert loss_bytes(qwen, 8192) == (2 + 4) * 3584 * 8192 + 4096 * 32768 * 2
    assert loss_bytes(shape, 200) == (2 + 4) * 256 * 200 + 200 * 32768 * 2


def test_dpo_plan_runs_chosen_and_rejected_together_and_keeps_a_reference_adapter(family_dirs):
    """DPO (method: dpo): chosen and rejected are one batch of twice the rows; the reference is TRL's
    frozen copy of the adapter, not a second base model."""
    shape = shape_from_config(read_config(str(family_dirs["llama"])))
    sft = PlanSettings(micro_batch_size=2, max_length=100, lora_r=8, optimizer="adamw_torch", lora_dropout=0.0)
    dpo = PlanSettings(**{**sft.__dict__, "sequences_per_row": 2, "reference_adapter": True})
    plan_sft, plan_dpo = plan_memory(shape, sft), plan_memory(shape, dpo)
    assert plan_dpo.term("activations kept") == 2 * plan_sft.term("activations kept")
    assert plan_dpo.term("reference adapter (DPO)") == plan_sft.term("LoRA weights")
    assert plan_dpo.term("base weights, 4-bit") == plan_sft.term("base weights, 4-bit")  # no second base
    assert plan_dpo.trainable_params == plan_sft.trainable_params
    assert plan_dpo.term("transient peak") >= plan_sft.term("transient peak")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(("double_quant", "precision"), [(True, "bf16"), (False, "bf16"), (True, "fp32")])
def test_weight_terms_match_loaded_4bit_models(family_dirs, tmp_path, family, double_quant, precision):
    """Also in fp32 compute, where an untied input embedding stays in its stored bf16 and the rest is fp32."""
    from qlora_pipe.models.loading import add_lora, load_base_model

    recipe = plan_recipe(family_dirs[family], tmp_path, precision=precision)
    recipe = recipe.model_copy(
        update={"quantization": recipe.quantization.model_copy(update={"double_quant": double_quant})}
    )
    plan = recipe_plan(recipe, None, micro_batch_size=1, max_length=64)
    model = add_lora(load_base_model(recipe, torch.device("cpu")), recipe).model
    measured = measure_weight_bytes(model)
    predicted_4bit = plan.term("base weights, 4-bit")
    assert abs(predicted_4bit - measured.quantized) <= 0.03 * measured.quantized
    predicted_frozen = plan.term("base weights, not quantized")
    assert abs(predicted_frozen - (measured.other - measured.trainable)) <= 0.03 * measured.other
    assert plan.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if precision == "fp32":  # Gemma ties its embeddings and scales them in the weight's dtype: all fp32
        stored = torch.float32 if family == "gemma" else torch.bfloat16
        assert model.get_input_embeddings().weight.dtype == stored


def as_trl_trains_it(model):
    """The adapter in bf16, as TRL's trainers cast it for a 4-bit model trained in bf16 (what the plan assumes)."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    return model


def _saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward in one forward pass (each storage once)."""
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    return sum(saved.values())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("lora", [{"dropout": 0.0}, {"dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}])
def test_activation_terms_match_saved_tensors(family_dirs, tmp_path, family, lora):
    from qlora_pipe.models.loading import add_lora, load_base_model

    batch, length = 2, 96
    for checkpointing in (False, True):
        recipe = plan_recipe(family_dirs[family], tmp_path, lora, gradient_checkpointing=checkpointing)
        model = as_trl_trains_it(add_lora(load_base_model(recipe, torch.device("cpu")), recipe).model.train())
        ids = torch.randint(0, 640, (batch, length))
        measured = _saved_bytes(model, ids)
        plan = recipe_plan(recipe, None, micro_batch_size=batch, max_length=length)
        logits_saved = 6 * batch * length * 640  # this plain forward's bf16 logits and their fp32 upcast
        if checkpointing:
            predicted = plan.term("activations kept") + logits_saved
        else:
            layers = plan.shape.num_layers
            predicted = layer_saved_bytes_per_token(plan.shape, plan.settings) * batch * length * layers + logits_saved
        assert abs(predicted - measured) <= 0.10 * measured, (checkpointing, predicted, measured)


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("tiled", [False, True])
def test_step_peak_matches_the_activation_terms(tmp_path_factory, tmp_path, checkpointing, tiled):
    """A whole forward + backward, measured: kept activations + the layer backward + gradients.

    A 128-entry vocabulary keeps the loss buffers negligible, so the layer terms are what is measured. The tiled
    MLP runs in tiles of 128 of the 512 tokens, planned with the same tile."""
    from qlora_pipe.models.loading import add_lora, load_base_model
    from qlora_pipe.models.tiled_mlp import tile_mlps

    folder = save_random_llama(
        tmp_path_factory.mktemp("wide"),
        vocab_size=128,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    recipe = plan_recipe(folder, tmp_path, {"dropout": 0.05}, gradient_checkpointing=checkpointing)
    model = as_trl_trains_it(add_lora(load_base_model(recipe, torch.device("cpu")), recipe).model.train())
    if tiled:
        tile_mlps(model, tile=128)
    ids = torch.randint(0, 128, (1, 512))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    step()  # the first step allocates the gradients once; later steps reuse nothing else
    model.zero_grad(set_to_none=True)
    measured = step_peak(step)
    plan = recipe_plan(recipe, None, micro_batch_size=1, max_length=512)
    settings = replace(plan.settings, tiled_mlp=tiled, mlp_tile_tokens=128)
    plan = plan_memory(plan.shape, settings)
    predicted = (
        plan.term("activations kept") + layer_transient_bytes(plan.shape, settings) + plan.term("LoRA gradients")
    )
    tolerance = 0.10 if checkpointing or not tiled else 0.25  # tiled without checkpointing: planned on the safe side
    assert -0.05 * measured <= predicted - measured <= tolerance * measured, (predicted, measured)


def test_bundled_configs_have_the_published_sizes():
    published = {
        "meta-llama/Llama-3.1-8B": 8.03e9,
        "Qwen/Qwen2.5-7B": 7.62e9,
        "mistralai/Mistral-7B-v0.3": 7.25e9,
        "google/gemma-2-9b": 9.24e9,
        "Qwen/Qwen2.5-14B": 14.77e9,
    }
    for name, params in published.items():
        shape = shape_from_config(read_config(name))
        assert abs(shape.total_params - params) <= 0.005 * params, name


def test_verdict_and_advice_are_consistent(family_dirs, tmp_path):
    recipe = plan_recipe(family_dirs["llama"], tmp_path)
    shape = shape_from_config(read_config(str(family_dirs["llama"])))
    s = PlanSettings.from_recipe(recipe, 4, 256)
    budget = plan_memory(shape, s).total + 1
    assert plan_memory(shape, s, budget).fits and plan_memory(shape, s, budget - 2).fits is False
    best = largest_micro_batch(shape, s, budget)
    assert best == 4  # the plan's own batch fits with one byte to spare; one more does not
    longest = longest_sequence(shape, s, budget)
    assert plan_memory(shape, replace(s, max_length=longest)).total <= budget
    assert plan_memory(shape, replace(s, max_length=longest + 64)).total > budget
    # Without checkpointing at a tight budget, turning it back on is the biggest saving.
    no_ckpt = replace(s, gradient_checkpointing=False, micro_batch_size=1, max_length=1024)
    advice = advise(plan_memory(shape, no_ckpt, budget))
    assert advice.best_switch == "training.gradient_checkpointing=true" and advice.best_saving > 0


def test_parse_size():
    """One grammar for --gpu-memory, training.memory_budget, --max-shard-size and export.max_shard_size."""
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("80 GB") == 80 * 10**9
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500mb") == 500 * 10**6 and parse_size("1.5KiB") == 1536
    assert parse_size("4096") == 4096
    with pytest.raises(UserError, match=r"--max-shard-size: 'lots' is not a size \(e.g. 24GiB"):
        parse_size("lots", "--max-shard-size")
    with pytest.raises(
        UserError, match=r"export.max_shard_size: not a size \(e.g. 24GiB, 5GB, 500MB\) \(got '5 parsecs'\)"
    ):
        validate_recipe({**recipe_dict(REPO, REPO / "runs"), "export": {"max_shard_size": "5 parsecs"}}, "r")


def test_plan_command_on_the_shipped_recipe(capsys):
    assert main(["plan", str(REPO / "recipes/qa-legal.yaml"), "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "base weights, 4-bit" in out and "fits" in out and "longest sequence" in out
    assert main(["plan", str(REPO / "recipes/qa-legal.yaml"), "--json", "--set", "data.max_length=8192"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_length"] == 8192 and report["total"] == sum(report["terms"].values())


def test_missing_or_unreadable_config_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    empty = tmp_path / "empty-model"
    empty.mkdir()
    recipe.write_text(f"model: {{name_or_path: {empty}}}\ndata: {{train_path: x.jsonl}}\n")
    assert main(["plan", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no config.json" in err
    (empty / "config.json").write_text("{not json")
    assert main(["plan", str(recipe)]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["plan", str(recipe), "--gpu-memory", "big"]) == 2


def test_readme_plan_table_is_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_known_models", REPO / "scripts/plan_known_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (REPO / "docs" / "planner.md").read_text()
    assert module.EXAMPLE_START + module.example() + module.EXAMPLE_END in page, (
        "docs/planner.md's plan example is stale: run python scripts/plan_known_models.py --docs"
    )
    assert module.START + module.table() + module.END in page, (
        "docs/planner.md's plan table is stale: run python scripts/plan_known_models.py --docs"
    )
    performance = (REPO / "docs" / "performance.md").read_text()
    assert module.LONG_START + module.long_context_table() + module.LONG_END in performance, (
        "docs/performance.md's long-context table is stale: run python scripts/plan_known_models.py --docs"
    )
