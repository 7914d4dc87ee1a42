"""The merge keeps the whole LoRA delta, even one below a bf16 step, and the export says how much it kept.

A trained weight is dequant(NF4(W)) + delta. Dequantized in bf16 the base sits on the bf16 grid, so rounding
``base + delta`` back to bf16 returns the base wherever the delta is under half a step: the delta is dropped.
The export dequantizes in fp32 and rounds the sum once."""

from __future__ import annotations

import copy
import json

import bitsandbytes as bnb
import torch
from safetensors.torch import load_file, save_file

from qlora_pipe.export.command import export_merged
from qlora_pipe.export.delta_kept import share_kept
from qlora_pipe.export.fidelity import fidelity_table
from qlora_pipe.export.verdict import judge
from qlora_pipe.recipe import validate_recipe
from qlora_pipe.training.stage import run_training
from tests.conftest import recipe_dict
from tests.helpers.export_models import make_base


def bf16_run(tokenizer_dir, tmp_path):
    """A tiny llama trained in bf16 (so bitsandbytes dequantizes into bf16, as on a GPU)."""
    base = make_base("llama", tokenizer_dir, tmp_path / "llama-base")
    raw = recipe_dict(base, tmp_path / "runs", max_steps=3, learning_rate=2e-2, report_to=["none"], precision="bf16")
    raw["lora"]["target_modules"] = "all-linear"
    raw["quantization"] = {"compute_dtype": "bfloat16"}
    return run_training(validate_recipe(raw))


def shrink_adapter(run_root, factor: float) -> None:
    """Scale every LoRA B so the learned delta is far below one bf16 step of its weight."""
    path = run_root / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v * factor if ".lora_B." in k else v for k, v in tensors.items()}, str(path))


def test_a_delta_below_one_bf16_step_is_kept_by_the_merge_and_dropped_by_a_bf16_dequant(tokenizer_dir, tmp_path):
    result = bf16_run(tokenizer_dir, tmp_path)
    shrink_adapter(result.run_dir.root, 0.002)
    module = result.model.base_model.model.model.layers[0].mlp.down_proj
    weight = module.base_layer.weight
    assert weight.quant_state.dtype == torch.bfloat16  # trained in bf16: bitsandbytes dequantizes to bf16
    delta = (
        0.002
        * module.scaling["default"]
        * (module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float())
    )
    base_bf16 = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    step = torch.finfo(torch.bfloat16).eps * base_bf16.abs()
    assert (delta.abs() < step / 2).float().mean() > 0.8  # most elements: their delta is under half a step

    # Today's merge (before this fix): the bf16-dequantized base plus the delta, rounded to bf16.
    dropped = share_kept(base_bf16, base_bf16 + delta, (base_bf16 + delta).to(torch.bfloat16))
    state = copy.copy(weight.quant_state)
    state.dtype = torch.float32
    base32 = bnb.functional.dequantize_4bit(weight.data, state)
    kept = share_kept(base32, base32 + delta, (base32 + delta).to(torch.bfloat16))
    assert dropped < 0.5 and 0.9 < kept < 1.1

    exported = export_merged(result.run_dir.root)  # defaults: bf16, verified
    summary = json.loads((exported.out / "export_info.json").read_text())["delta_kept"]
    assert summary["layers"] == 14 and summary["mean"] >= 0.97 and summary["worst"] >= 0.8
    assert exported.fidelity["passed"] and exported.fidelity["delta_kept"] == summary
    assert exported.fidelity["reference_noise"]["measured"]  # bf16 compute: its noise against fp32 measured


def test_a_dropped_delta_or_a_far_merge_fails_the_calibrated_check():
    numbers = {"relative_loss_change": 0.004, "relative_logit_diff": 0.03}
    assert not judge(dict(numbers), None)["passed"]  # over the fixed 2% logit floor
    quiet = {"relative_loss_change": 0.001, "relative_logit_diff": 0.001}
    noisy = {"relative_loss_change": 0.0023, "relative_logit_diff": 0.021}  # 30 layers, bf16 vs fp32 compute
    assert not judge(dict(numbers), quiet)["passed"]
    calibrated = judge(dict(numbers), noisy)
    assert calibrated["passed"] and calibrated["criteria"]["max_relative_logit_diff"] == 2 * 0.021
    far = {"relative_loss_change": 0.05, "relative_logit_diff": 0.2}
    assert not judge(dict(far), {"relative_loss_change": 0.5, "relative_logit_diff": 0.5})["passed"]  # capped


def test_an_fp32_run_exported_in_bf16_is_judged_against_its_own_bf16_noise(tokenizer_dir, tmp_path):
    """A run that computes in fp32 has no precision noise of its own, but its bf16 export rounds every weight
    once: the bound is calibrated on the trained model computed in bf16 against itself in fp32, whatever the
    CPU; an fp32 export has nothing to calibrate."""
    base = make_base("llama", tokenizer_dir, tmp_path / "llama-base")
    raw = recipe_dict(base, tmp_path / "runs", max_steps=3, learning_rate=2e-2, report_to=["none"], precision="fp32")
    raw["lora"]["target_modules"] = "all-linear"
    raw["quantization"] = {"compute_dtype": "float32"}
    result = run_training(validate_recipe(raw))
    exported = export_merged(result.run_dir.root)  # defaults: bf16, verified
    noise = exported.fidelity["reference_noise"]
    assert noise["measured"] and (noise["compute_dtype"], noise["against"]) == ("float32", "bfloat16"), noise
    assert 0 < noise["relative_logit_diff"] < 0.05 and 0 <= noise["relative_loss_change"] < 0.01, noise
    assert exported.fidelity["passed"], exported.fidelity
    assert "reference noise (float32 vs bfloat16 compute)" in fidelity_table(exported.fidelity)
    fp32 = export_merged(result.run_dir.root, out=tmp_path / "merged-fp32", dtype="float32")
    assert not fp32.fidelity["reference_noise"]["measured"] and fp32.fidelity["passed"]
