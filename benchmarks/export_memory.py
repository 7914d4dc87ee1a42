"""Peak memory of our streaming export vs loading the base and calling PEFT's merge_and_unload.

    python -m benchmarks export-memory [--hidden 2048 --layers 10 --base-shard-size 200MB]   (1.2 GiB in bf16)

Builds a Llama-shaped base with random weights (saved in shards of --base-shard-size) and a random
LoRA adapter (r=16 on every linear layer) in a temporary folder, lays out a finished run around
them, then measures each side in its own process (peak RSS from the kernel): `qlora-pipe export
--no-verify` with the default export settings (NF4-faithful; one output shard of up to 5 GB) and
the usual script (load bf16 base, PeftModel.from_pretrained, merge_and_unload, save_pretrained).
Reports ours above the libraries as a multiple of the model size. Writes
benchmarks/results/export-memory-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from qlora_pipe.machine.hardware import machine_description

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python -m benchmarks export-memory"

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(base, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], max_shard_size="100MB")
"""

MEASURE = """
import resource, subprocess, sys, time
started = time.time()
code = subprocess.call(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(f"{code} {peak} {time.time() - started:.1f}")
"""


def build(folder: Path, hidden: int, layers: int, shard: str = "200MB") -> tuple[Path, Path, int]:
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_pipe.quickstart.builder import build_tokenizer

    base_dir, run_dir = folder / "base", folder / "runs" / "bench"
    tokenizer = build_tokenizer((REPO / "data/legal-qa/corpus.txt").read_text(), 2048)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(base_dir, max_shard_size=shard)
    tokenizer.save_pretrained(base_dir)
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    recipe = {
        "run_name": "bench",
        "output_dir": str(folder / "runs"),
        "model": {"name_or_path": str(base_dir)},
        "data": {"train_path": str(REPO / "data/legal-qa/train.jsonl")},
    }
    (run_dir / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    (run_dir / "summary.json").write_text("{}\n")
    return base_dir, run_dir, size


def measure(command: list[str]) -> tuple[int, float]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True, cwd=REPO
    )
    code, peak, seconds = out.stdout.split()[-3:]
    if int(code) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return int(peak), float(seconds)


def compare(base_dir: Path, run_dir: Path, folder: Path, ours_out: Path) -> dict[str, float]:
    """Our streaming export vs load + merge_and_unload + save, and the libraries' own footprint."""
    cli = [sys.executable, "-m", "qlora_pipe.cli", "export", str(run_dir), "--no-verify", "--out", str(ours_out)]
    ours_peak, ours_s = measure(cli)
    peft_peak, peft_s = measure([sys.executable, "-c", PEFT_MERGE, str(base_dir), str(run_dir), str(folder / "m2")])
    idle_peak, _ = measure([sys.executable, "-c", "import torch, transformers, peft, bitsandbytes"])
    return {
        "ours_peak_rss_bytes": ours_peak,
        "ours_seconds": ours_s,
        "peft_merge_and_unload_peak_rss_bytes": peft_peak,
        "peft_seconds": peft_s,
        "libraries_only_peak_rss_bytes": idle_peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--base-shard-size", default="200MB", help="shard size of the base checkpoint")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base_dir, run_dir, size = build(folder, args.hidden, args.layers, args.base_shard_size)
        measured = compare(base_dir, run_dir, folder, folder / "m1")
    result = {
        "date": date.today().isoformat(),
        "machine": machine_description(),
        "command": f"{COMMAND} --hidden {args.hidden} --layers {args.layers} --base-shard-size {args.base_shard_size}",
        "model_bytes_bf16": size,
        **measured,
        "ours_above_libraries_x_model": (measured["ours_peak_rss_bytes"] - measured["libraries_only_peak_rss_bytes"])
        / size,
    }
    ours_peak, ours_s = measured["ours_peak_rss_bytes"], measured["ours_seconds"]
    peft_peak, peft_s = measured["peft_merge_and_unload_peak_rss_bytes"], measured["peft_seconds"]
    idle_peak = measured["libraries_only_peak_rss_bytes"]
    shard = args.base_shard_size.lower()
    out = REPO / "benchmarks/results" / f"export-memory-{result['date']}-base-{shard}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    gib = 2**30
    print("| | peak RSS | time |\n|---|---|---|")
    print(f"| model size (bf16) | {size / gib:.2f} GiB | |")
    print(f"| importing the libraries only | {idle_peak / gib:.2f} GiB | |")
    above = result["ours_above_libraries_x_model"]
    print(
        f"| qlora-pipe export (NF4-faithful, streaming, default settings) | {ours_peak / gib:.2f} GiB "
        f"({above:.2f}x the model above the libraries) | {ours_s:.0f} s |"
    )
    print(f"| load + PEFT merge_and_unload + save | {peft_peak / gib:.2f} GiB | {peft_s:.0f} s |")
    print(f"written: {out}")
    return 0
