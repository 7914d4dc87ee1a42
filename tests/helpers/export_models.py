"""Small random bases of several architectures, with the tokenizer of the ``tokenizer_dir`` fixture (tests/conftest.py),
and a short LoRA run on one, for the export tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qlora_pipe.recipe import validate_recipe
from qlora_pipe.training.stage import run_training
from tests.conftest import recipe_dict

SMALL = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}
ARCHITECTURES = {
    "llama": {"model_type": "llama", "num_key_value_heads": 1, **SMALL},
    "mistral": {"model_type": "mistral", "num_key_value_heads": 1, **SMALL},
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 1, **SMALL},  # q/k/v biases
    "gemma": {"model_type": "gemma", "num_key_value_heads": 1, "head_dim": 64, **SMALL},  # tied embeddings
    "phi3": {"model_type": "phi3", "num_key_value_heads": 2, **SMALL},  # fused qkv_proj, gate_up_proj
    "gpt2": {"model_type": "gpt2", "n_embd": 128, "n_layer": 2, "n_head": 2, "n_inner": 256},  # Conv1D
}


def make_base(kind: str, tokenizer_dir: Path, out: Path) -> Path:
    spec = dict(ARCHITECTURES[kind])
    model_type = spec.pop("model_type")
    ids = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 3}  # the tokenizer's special tokens
    config = AutoConfig.for_model(model_type, vocab_size=512, **ids, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-trivial biases, so a dropped bias would show
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    model.to(torch.bfloat16).save_pretrained(out)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, out / item.name)
    return out


def trained_run(kind: str, tokenizer_dir: Path, tmp_path: Path, **lora):
    base = make_base(kind, tokenizer_dir, tmp_path / f"{kind}-base")
    raw = recipe_dict(base, tmp_path / "runs", max_steps=3, learning_rate=2e-2, report_to=["none"])
    raw["lora"].update({"target_modules": "all-linear", **lora})
    raw["run_name"] = kind
    recipe = validate_recipe(raw)
    return recipe, run_training(recipe)
