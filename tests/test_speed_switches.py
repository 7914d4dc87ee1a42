"""Speed and memory switches: each reaches the library argument that provides it; impossible ones fail early."""

from __future__ import annotations

import math
import os

import pytest
import torch
import yaml
from conftest import recipe_dict

from qlora_pipe.cli import main
from qlora_pipe.errors import UserError
from qlora_pipe.recipe import validate_recipe
from qlora_pipe.runs import RunDir
from qlora_pipe.training.config import sft_config
from qlora_pipe.training.micro_batch import BatchChoice
from qlora_pipe.training.speed_switches import check_speed_switches
from qlora_pipe.training.stage import run_training


def built_config(recipe):
    """The real SFTConfig that build_trainer hands to TRL, as a GPU machine would build it."""
    return sft_config(recipe, RunDir(recipe.run_dir()), torch.device("cpu"), BatchChoice(2, 1))


def test_defaults_leave_every_switch_off(make_recipe):
    config = built_config(make_recipe())
    assert (config.padding_free, config.use_liger_kernel, config.activation_offloading, config.torch_compile) == (
        False,
        False,
        False,
        False,
    )
    assert config.max_length == 256
    assert config.loss_type == "nll"  # TRL 1.16: always the chunked fused LM head


@pytest.mark.parametrize(
    ("switch", "field"),
    [
        ("liger_kernels", "use_liger_kernel"),
        ("activation_offloading", "activation_offloading"),
        ("torch_compile", "torch_compile"),
    ],
)
def test_each_training_switch_reaches_sft_config(make_recipe, switch, field):
    config = built_config(make_recipe(**{switch: True}))
    assert getattr(config, field) is True


def test_padding_free_reaches_trl_without_a_max_length_it_cannot_enforce(make_recipe):
    recipe = make_recipe(padding_free=True)
    recipe.model.attn_implementation = "flash_attention_2"
    config = built_config(recipe)
    # data.py already enforced data.max_length row by row; TRL 1.16 raises if given one without packing.
    assert config.padding_free is True and config.max_length is None
    recipe.data.packing = True
    assert built_config(recipe).max_length == 256


def test_attention_implementation_reaches_the_loaded_model(make_recipe):
    from qlora_pipe.models.loading import load_base_model

    recipe = make_recipe()
    recipe.model.attn_implementation = "eager"
    assert load_base_model(recipe).config._attn_implementation == "eager"


def write_recipe(tmp_path, tiny_model_dir, model=None, data=None, **training) -> str:
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs", **training)
    raw["model"].update(model or {})
    raw["data"].update(data or {})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"liger_kernels": True}, "training.liger_kernels: needs a CUDA GPU; set it to false"),
        ({"activation_offloading": True}, "training.activation_offloading: needs a CUDA GPU"),
        (
            {"model": {"attn_implementation": "flash_attention_2"}},
            "model.attn_implementation: flash_attention_2: needs a CUDA GPU; set it to sdpa",
        ),
        ({"padding_free": True}, "training.padding_free: needs model.attn_implementation: flash_attention_2"),
    ],
)
def test_impossible_switch_is_one_line_before_any_loading(tiny_model_dir, tmp_path, capsys, change, message):
    path = write_recipe(tmp_path, tiny_model_dir, **change)
    assert main(["train", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "runs" / "test" / "adapter_model.safetensors").exists()


def test_padding_free_with_packing_is_accepted(make_recipe):
    recipe = make_recipe(padding_free=True)
    recipe.data.packing = True
    check_speed_switches(recipe, gpu=False)


@pytest.mark.parametrize(
    ("key", "module"),
    [("liger_kernels", "liger_kernel"), ("attn_implementation", "flash_attn")],
)
def test_missing_package_names_what_to_install(tiny_model_dir, tmp_path, monkeypatch, key, module):
    import qlora_pipe.training.speed_switches as speed

    monkeypatch.setattr(speed, "_installed", lambda name: name != module)
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs")
    if key == "liger_kernels":
        raw["training"]["liger_kernels"] = True
    else:
        raw["model"]["attn_implementation"] = "flash_attention_2"
    with pytest.raises(UserError, match=rf"the {module} package is not installed \(pip install "):
        check_speed_switches(validate_recipe(raw, "test"), gpu=True)


@pytest.mark.skipif(
    os.environ.get("QLORA_PIPE_SLOW_TESTS") != "1",
    reason="inductor compiles for ~140 s on 2 CPU cores (a benchmark): set QLORA_PIPE_SLOW_TESTS=1",
)
def test_torch_compile_trains_on_cpu(make_recipe):
    recipe = make_recipe(torch_compile=True, max_steps=2, report_to=["none"])
    recipe.data.eval_path = None
    result = run_training(recipe)
    assert result.summary["steps"] == 2
    assert math.isfinite(result.summary["final_train_loss"])
