"""`qlora-pipe plan --gpus N`: each GPU's peak under FSDP-QLoRA, term by term (plan/fsdp.py).

The published checks (Answer.AI's 70B on 2 x 24 GB, torchtune's 405B) are in tests/test_plan.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qlora_pipe.cli import main
from qlora_pipe.plan.fsdp import LAYERS_TERM, QUANT_STATE_TERM, REDUCE_TERM, ROOT_TERM, packed_bytes
from qlora_pipe.plan.shapes import read_config, shape_from_config
from qlora_pipe.plan.terms import PlanSettings, nf4_tensor_bytes, plan_memory
from tests.conftest import plan_recipe

REPO = Path(__file__).resolve().parents[1]
FSDP_RECIPE = str(REPO / "recipes/llama3-70b-fsdp.yaml")


def _tiny(family_dirs):
    shape = shape_from_config(read_config(str(family_dirs["llama"])))
    s = PlanSettings(micro_batch_size=2, max_length=100, lora_r=8, optimizer="adamw_torch", lora_dropout=0.0)
    return shape, s


def test_terms_of_a_tiny_config_on_four_gpus_by_hand(family_dirs):
    shape, one = _tiny(family_dirs)
    four = replace(one, gpus=4)
    plan1, plan4 = plan_memory(shape, one), plan_memory(shape, four)
    # Per layer: q, o 256x256; k, v 256x128; gate, up, down 256x768 (tests/test_plan.py).
    sizes = [65536, 32768, 32768, 65536, 196608, 196608, 196608]
    packed = 2 * sum(n // 2 for n in sizes)
    assert plan4.term("base weights, 4-bit") == math.ceil(packed / 4)
    quantized = 2 * sum(nf4_tensor_bytes(n, double_quant=True) for n in sizes)
    assert plan4.term(QUANT_STATE_TERM) == quantized - packed  # whole on every GPU
    assert plan4.term("base weights, not quantized") == math.ceil(shape.other_params * 2 / 4)
    lora = plan1.trainable_params
    assert plan4.term("LoRA weights") == plan4.term("LoRA gradients") == math.ceil(lora * 2 / 4)
    assert plan4.term("optimizer states") == math.ceil(lora * 4 / 4)
    # The root unit: embeddings and lm_head (640 x 256 each) and the final norm, bf16, whole.
    assert plan4.term(ROOT_TERM) == (2 * 640 * 256 + 256) * 2
    # Two decoder layers whole: packed 4-bit linears, two norms, the layer's adapter (bf16).
    layer_lora = 8 * sum(256 + out for out in (256, 128, 128, 256)) + 8 * 3 * (256 + 768)
    assert layer_lora * 2 == lora  # two layers
    assert plan4.term(LAYERS_TERM) == 2 * (packed // 2 + 2 * 256 * 2 + layer_lora * 2)
    assert plan4.term(REDUCE_TERM) == layer_lora * 2
    # Each GPU runs its own micro batch: the activation terms are the one-GPU plan's.
    for name in ("activations kept", "transient peak"):
        assert plan4.term(name) == plan1.term(name)
    assert plan4.trainable_params == plan1.trainable_params


def test_more_gpus_never_raise_the_peak(family_dirs):
    shape, one = _tiny(family_dirs)
    totals = [plan_memory(shape, replace(one, gpus=n)).total for n in (2, 3, 4, 8, 16)]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]


def test_cpu_offload_moves_the_shards_off_the_gpu(family_dirs):
    shape, one = _tiny(family_dirs)
    plain, offload = (
        plan_memory(shape, replace(one, gpus=2)),
        plan_memory(shape, replace(one, gpus=2, cpu_offload=True)),
    )
    for name in ("base weights, 4-bit", "base weights, not quantized", "LoRA weights", "LoRA gradients"):
        assert offload.term(name) == 0 and plain.term(name) > 0
    assert offload.term("optimizer states") == 0
    for name in (QUANT_STATE_TERM, ROOT_TERM, LAYERS_TERM, REDUCE_TERM, "activations kept", "transient peak"):
        assert offload.term(name) == plain.term(name)


def test_one_gpu_is_the_plan_of_today(capsys):
    assert main(["plan", FSDP_RECIPE]) == 0
    default = capsys.readouterr().out
    assert main(["plan", FSDP_RECIPE, "--gpus", "1"]) == 0
    assert capsys.readouterr().out == default
    assert "FSDP" not in default and ROOT_TERM not in default
    assert main(["plan", FSDP_RECIPE, "--gpus", "1", "--json"]) == 0
    assert "gpus" not in json.loads(capsys.readouterr().out)


def test_plan_command_per_gpu(capsys):
    assert main(["plan", FSDP_RECIPE, "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "FSDP on 4 GPUs" in out and "budget per GPU" in out and "fewest GPUs that fit" in out
    for name in (QUANT_STATE_TERM, ROOT_TERM, LAYERS_TERM, REDUCE_TERM, "1/4 of"):
        assert name in out
    assert main(["plan", FSDP_RECIPE, "--gpus", "2", "--cpu-offload", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gpus"] == 2 and report["cpu_offload"] is True
    assert report["total"] == sum(report["terms"].values()) and report["terms"]["base weights, 4-bit"] == 0


@pytest.mark.parametrize("bad", ["0", "-1", "1.5", "two", ""])
def test_bad_gpu_count_is_one_line(capsys, bad):
    assert main(["plan", FSDP_RECIPE, f"--gpus={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--gpus: expected a whole number of GPUs" in err


def test_cpu_offload_needs_several_gpus(capsys):
    assert main(["plan", FSDP_RECIPE, "--cpu-offload"]) == 2
    assert "--cpu-offload" in capsys.readouterr().err


def test_quant_state_stays_on_the_module_and_storage_keeps_the_packed_bytes(family_dirs, tmp_path):
    """What the FSDP terms rest on, on a real 4-bit model with quant_storage = bfloat16: each weight's
    parameter holds exactly its n/2 packed bytes (what FSDP shards), and the absmax / code books are held
    by the module as ``quant_state``, not by any parameter (so FSDP neither shards nor gathers them)."""
    import bitsandbytes as bnb

    from qlora_pipe.model import load_base_model

    recipe = plan_recipe(family_dirs["llama"], tmp_path)
    q = recipe.quantization.model_copy(update={"quant_storage": "bfloat16", "compute_dtype": "bfloat16"})
    model = load_base_model(recipe.model_copy(update={"quantization": q}), torch.device("cpu"))
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears
    for module in linears:
        weight = module.weight
        assert weight.dtype == torch.bfloat16
        assert weight.numel() * weight.element_size() == packed_bytes(module.in_features * module.out_features)
        state = module.quant_state  # set by Params4bit when it quantizes; forward restores it onto the weight
        assert state is not None and state.absmax is not None and state is module.weight.quant_state
        assert all(state.absmax is not p for p in model.parameters())
