"""The streaming export never holds the whole model: its peak memory does not grow with model size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import yaml

from tests.conftest import TRAIN

REPO = Path(__file__).resolve().parents[1]
MEASURE = "import resource, subprocess, sys; subprocess.check_call(sys.argv[1:]); " + (
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
)


def finished_run(folder: Path, layers: int, tokenizer_dir: Path) -> tuple[Path, int]:
    """A Llama-shaped base (random weights, 32 MB shards) and a random LoRA adapter laid out as a finished run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers, num_attention_heads=8
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
        "export": {"max_shard_size": "16MB", "verify": False},
    }
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    (run / "summary.json").write_text("{}\n")
    return run, size


def export_peak(run: Path) -> int:
    command = [sys.executable, "-m", "qlora_pipe.cli", "export", str(run)]
    out = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_peak_memory_does_not_grow_with_model_size(tiny_model_dir, tmp_path):
    small_run, small = finished_run(tmp_path / "small", 8, tiny_model_dir)  # several shards already
    large_run, large = finished_run(tmp_path / "large", 40, tiny_model_dir)
    assert large - small > 150 * 2**20  # large enough to tell
    growth = export_peak(large_run) - export_peak(small_run)
    # Holding the model would add at least (large - small); streaming adds only noise.
    assert growth < 0.25 * (large - small), (
        f"peak grew by {growth / 2**20:.0f} MiB for {(large - small) / 2**20:.0f} MiB"
    )
    assert (large_run / "merged" / "model.safetensors.index.json").is_file()
