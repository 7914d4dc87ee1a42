"""The shipped accelerate configs parse with accelerate's own loader, and sharded launches check quant storage."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

from qlora_pipe.errors import UserError
from qlora_pipe.model import check_sharded_quantization

CONFIGS = Path(__file__).resolve().parents[1] / "accelerate"


@pytest.mark.parametrize(
    ("name", "kind"), [("ddp.yaml", "MULTI_GPU"), ("fsdp_qlora.yaml", "FSDP"), ("deepspeed_zero3.yaml", "DEEPSPEED")]
)
def test_shipped_configs_load(name, kind):
    config = ClusterConfig.from_yaml_file(CONFIGS / name)
    assert str(config.distributed_type).endswith(kind)
    assert config.mixed_precision == "bf16"


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_launch_needs_matching_quant_storage(make_recipe, monkeypatch, variable):
    monkeypatch.setenv(variable, "true")
    recipe = make_recipe(quantization={"compute_dtype": "bfloat16"})
    with pytest.raises(UserError, match=r"quant_storage = compute_dtype \(bfloat16\), got uint8"):
        check_sharded_quantization(recipe)
    recipe.quantization.quant_storage = "bfloat16"
    check_sharded_quantization(recipe)
