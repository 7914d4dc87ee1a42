"""Small random bases of several architectures, with the tokenizer of the ``tokenizer_dir`` fixture (tests/conftest.py),
and a short LoRA run on one, for the export tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from qlora_pipe.machine.hardware import resolve_recipe_precision
from qlora_pipe.recipe import validate_recipe
from qlora_pipe.training.stage import run_training
from tests.conftest import TRAIN, recipe_dict

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


def finished_run(
    folder: Path, layers: int, tokenizer_dir: Path, hidden: int = 512, intermediate: int = 1408
) -> tuple[Path, int]:
    """A Llama-shaped base (random weights, 32 MB shards) and a random LoRA adapter laid out as a finished
    run; the export keeps its default settings (one output shard of up to 5 GB)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    base, run = folder / "base", folder / "runs" / "run"
    model.save_pretrained(base, max_shard_size="32MB")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(base)
    get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).save_pretrained(run)
    tokenizer.save_pretrained(run)
    recipe = {
        "run_name": "run",
        "output_dir": str(folder / "runs"),
        "model": {"name_or_path": str(base)},
        "data": {"train_path": str(TRAIN)},
        "export": {"verify": False},
    }
    settled = resolve_recipe_precision(validate_recipe(recipe))[0]  # as training records it on this machine
    recipe["training"] = {"precision": settled.training.precision}
    recipe["quantization"] = {"compute_dtype": settled.quantization.compute_dtype}
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    (run / "summary.json").write_text("{}\n")
    return run, size
