"""The shipped accelerate configs parse with accelerate's own loader, and sharded launches check quant storage."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

from qlora_pipe.errors import UserError
from qlora_pipe.models.loading import check_sharded_quantization

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


def test_sharded_launch_refuses_pushing_checkpoints(make_recipe, monkeypatch):
    """Under FSDP a checkpoint holds per-process shards (torch.distributed.checkpoint), not a PEFT adapter."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = make_recipe(quantization={"compute_dtype": "float32", "quant_storage": "float32"})
    recipe.hub.repo_id, recipe.hub.push_checkpoints = "someone/adapter", True
    with pytest.raises(UserError, match=r"hub.push_checkpoints: under fsdp a checkpoint holds each process's shard"):
        check_sharded_quantization(recipe)
    recipe.hub.push_checkpoints, recipe.hub.push_adapter_at_end = False, True
    check_sharded_quantization(recipe)


def test_fsdp_config_is_fsdp2_without_rank0_only_loading():
    """FSDP2 (accelerate's fsdp2_prepare_model shards 4-bit weights stored as floats); rank-0-only loading off,
    since accelerate's FSDP2 path does not broadcast rank 0's weights for a 4-bit model."""
    fsdp = ClusterConfig.from_yaml_file(CONFIGS / "fsdp_qlora.yaml").fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_cpu_ram_efficient_loading"] is False
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_launch_refuses_grpo(make_recipe, monkeypatch, variable):
    monkeypatch.setenv(variable, "true")
    recipe = make_recipe(quantization={"compute_dtype": "float32", "quant_storage": "float32"})
    recipe = recipe.model_copy(update={"method": "grpo"})  # the refusal reads the method alone
    with pytest.raises(UserError, match=r"method: grpo under a (fsdp|deepspeed) launch is not supported"):
        check_sharded_quantization(recipe)


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_launch_refuses_an_auto_micro_batch(make_recipe, monkeypatch, variable):
    monkeypatch.setenv(variable, "true")
    recipe = make_recipe(quantization={"compute_dtype": "float32", "quant_storage": "float32"})
    recipe.training.micro_batch_size = "auto"
    with pytest.raises(UserError, match=r"micro_batch_size: auto probes one process's step, not a (fsdp|deepspeed)"):
        check_sharded_quantization(recipe)
