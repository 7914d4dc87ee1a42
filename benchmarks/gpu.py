"""The GPU check: a Llama-3.1-8B-shaped QLoRA run under a 24 GB cap, through our real training path.

    bash scripts/gpu_check.sh            # = python -m benchmarks gpu   (under 8 minutes on one GPU)
    python -m benchmarks gpu --dry       # tiny shapes on CPU, seconds: keeps this benchmark from rotting

No download: the model is built from a LlamaConfig with random weights, directly in 4-bit on the GPU,
one linear layer at a time (never a 16 GB bf16 copy, never a save/load). Our default recipe then adds
LoRA (model.add_lora) and trains through build_trainer (PipeTrainer, TRL's fused chunked loss) at
sequence lengths 2k/4k/8k: tokens/s, model FLOPs utilisation, peak memory beside the planner's
prediction, then the longest sequence that fits the cap (doubling, then bisection on OOM).
Writes benchmarks/results/gpu-<date>-<gpu>.json (dry: <out>/gpu-dry.json).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from benchmarks.flops import TransformerShape, qlora_flops_per_token
from benchmarks.gpu_anchors import flash_attention, torchtune_point, unsloth_point, with_rank
from benchmarks.gpu_long_context import long_context
from benchmarks.gpu_model import REFERENCES, build_4bit_llama, llama_config, peak_bf16_flops
from benchmarks.gpu_paths import quickstart_pipeline, resume_after_sigterm
from benchmarks.gpu_report import headline
from benchmarks.gpu_trials import (
    REPO,
    Search,
    default_recipe,
    longest_fitting,
    planned_bytes,
    planner_error_percent,
    release_after_oom,
    train_steps,
)
from benchmarks.stages import Results, print_summary_on_signal

COMMAND = "python -m benchmarks gpu"

# "24 GB" as a 24 GiB card leaves it to PyTorch after the CUDA context and cuBLAS workspaces (about 1.6 GiB).
CAP_BYTES = 24 * 10**9


# Recipe switches measured at the first length, one at a time; Liger patches the model in place, so it is last.
SWITCHES = [{"activation_offloading": True}, {"torch_compile": True}, {"liger_kernels": True}]


def measure_switches(model, tokenizer, tmp: Path, args: argparse.Namespace, config) -> list[dict[str, Any]]:
    """Each speed/memory switch beside the default at one length, or why it was not run here."""
    from qlora_pipe.errors import UserError
    from qlora_pipe.training.speed_switches import check_speed_switches

    length, rows = args.lengths[0], []
    for switch in SWITCHES:
        name = next(iter(switch))
        row: dict[str, Any] = {"switch": f"training.{name}", "length": length}
        try:
            check_speed_switches(default_recipe(tmp, length, **switch))
            if args.dry and name == "torch_compile":
                raise UserError("compiling takes minutes on CPU; measured on GPU runs only")
            row.update(train_steps(model, tokenizer, tmp, length, args.steps, config.vocab_size, **switch))
            row["planned"] = planned_bytes(default_recipe(tmp, length, **switch), config, length)
        except UserError as exc:
            row["skipped"] = str(exc)
        except torch.OutOfMemoryError:
            row["skipped"] = "out of memory"
        if row.get("skipped") == "out of memory":
            release_after_oom()  # outside the handler: the exception no longer pins the trial's tensors
        rows.append(row)
        outcome = row.get("skipped") or f"{row['tokens_per_second']:.0f} tokens/s, peak {row['peak_memory_bytes']}"
        print(f"  {name}: {outcome}", flush=True)
    return rows


# Each stage has its own time limit (seconds on a GPU), and all of them share BUDGET_SECONDS: what does
# not fit is recorded as not run, for a second run with --resume.
STAGE_LIMITS = {
    "lengths": 90,
    "longest_sequence": 120,
    "quickstart_pipeline": 90,
    "resume_after_sigterm": 90,
    "unsloth_anchor": 150,
    "torchtune_anchor": 150,
    "flash_attention": 60,
    "switches": 150,
    "long_context": 300,
}
BUDGET_SECONDS = 450  # from the start, the 4-bit build included: the whole check within 8 minutes


def measure(args: argparse.Namespace, tmp: Path, results: Results) -> None:
    from qlora_pipe.models.loading import add_lora
    from qlora_pipe.plan.shapes import shape_from_config
    from qlora_pipe.quickstart.builder import build_tokenizer

    config = llama_config(dry=args.dry)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    base = build_4bit_llama(config, device)
    built = time.time() - started
    tokenizer = build_tokenizer((REPO / "data/legal-qa/corpus.txt").read_text(encoding="utf-8"), 512)
    recipe = default_recipe(tmp, max(args.lengths))
    trainable = add_lora(base, recipe)
    # From the config's shapes (the planner's meta-device count): packed 4-bit tensors hide their weight count.
    params = shape_from_config(config.to_dict()).total_params
    peak_flops = peak_bf16_flops()
    results.record("model", {**config.to_diff_dict(), "parameters_counted": params, "build_seconds": round(built, 1)})
    results.record("trainable_params", trainable.trainable_params)
    results.record("peak_bf16_flops", peak_flops)
    model = trainable.model

    def lengths() -> list[dict[str, Any]]:
        rows = results.data.setdefault("lengths_so_far", [])
        for length in args.lengths:
            if any(row["length"] == length for row in rows):
                continue
            result = train_steps(model, tokenizer, tmp, length, args.steps, config.vocab_size)
            # QLoRA's own FLOPs (benchmarks/flops.py): no weight gradients for the frozen base; the hardware
            # figure adds the forward pass that gradient checkpointing recomputes.
            flops = qlora_flops_per_token(TransformerShape.from_config(config), recipe.lora.r, length)
            per_second = result["tokens_per_second"]
            result.update(
                length=length,
                model_flops_per_step=flops["model"] * length,
                hardware_flops_per_step=flops["hardware_with_recompute"] * length,
                mfu=flops["model"] * per_second / peak_flops if peak_flops else None,
                hfu=flops["hardware_with_recompute"] * per_second / peak_flops if peak_flops else None,
                planned=planned_bytes(default_recipe(tmp, length), config, length),
            )
            result["planner_error_percent"] = planner_error_percent(result["planned"], result["peak_memory_bytes"])
            rows.append(result)
            results.write()  # each length is on disk as soon as it is measured
            print(f"  {length}: {per_second:.0f} tokens/s, peak {result['peak_memory_bytes']}", flush=True)
        return results.data.pop("lengths_so_far")

    def search() -> dict[str, Any]:
        progress = results.data.setdefault("search_progress", {})
        tried = progress.setdefault("longest_sequence", [])
        found = longest_fitting(
            model, tokenizer, tmp, config.vocab_size, Search(**search_bounds, tried=tried, save=results.write)
        )
        progress.pop("longest_sequence")
        return found

    def unsloth() -> dict[str, Any]:
        nonlocal model
        model = with_rank(model, tmp, 32)
        progress = results.data.setdefault("search_progress", {}).setdefault("unsloth_anchor", {})
        found = unsloth_point(model, tokenizer, tmp, config, search_bounds, progress, results.write)
        results.data["search_progress"].pop("unsloth_anchor")
        return found

    def torchtune() -> dict[str, Any]:
        nonlocal model
        model = with_rank(model, tmp, 8)
        return torchtune_point(model, tokenizer, tmp, config, args.steps, args.dry, peak_flops)

    def long_context_stage() -> dict[str, Any]:
        nonlocal model
        model = with_rank(model, tmp, recipe.lora.r)
        progress = results.data.setdefault("search_progress", {}).setdefault("long_context", {})
        found = long_context(model, tokenizer, tmp, config, CAP_BYTES, args.dry, progress, results.write)
        results.data["search_progress"].pop("long_context")
        return found

    def switches() -> list[dict[str, Any]]:
        nonlocal model
        model = with_rank(model, tmp, recipe.lora.r)  # the switches are compared with the default lengths
        return measure_switches(model, tokenizer, tmp, args, config)

    search_bounds = {"start": max(args.lengths), "limit": args.search_limit, "granularity": args.granularity}
    search_bounds["oom_above"] = args.oom_above
    work = tmp / "cli"
    # The riskiest last: compile and Liger (which patches the model in place) are in the final stage.
    stages = {
        "lengths": lengths,
        "longest_sequence": search,
        "quickstart_pipeline": lambda: quickstart_pipeline(work, args.dry),
        "resume_after_sigterm": lambda: resume_after_sigterm(work, args.dry),
        "unsloth_anchor": unsloth,
        "torchtune_anchor": torchtune,
        "flash_attention": lambda: flash_attention(
            model, tokenizer, tmp, args.lengths[0], args.steps, config.vocab_size
        ),
        "switches": switches,
        "long_context": long_context_stage,
    }
    faults = {stage: "crash" for stage in args.simulate_crash} | {stage: "hang" for stage in args.simulate_hang}
    for stage, work_of in stages.items():
        if args.stages is None or stage in args.stages:
            results.run(stage, work_of, args.stage_limit or STAGE_LIMITS[stage], faults)
    if not results.data.get("search_progress"):
        results.data.pop("search_progress", None)  # every search finished: its progress is in its stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny shapes on CPU, a few steps, seconds")
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default $QLORA_PIPE_RESULTS, else benchmarks/results)"
    )
    parser.add_argument("--resume", action="store_true", help="keep the stages an earlier run of this file measured")
    parser.add_argument("--stage-limit", type=int, default=None, help="seconds per stage (default: per stage)")
    parser.add_argument("--simulate-crash", action="append", default=[], metavar="STAGE", help="dry runs: fail STAGE")
    parser.add_argument("--simulate-hang", action="append", default=[], metavar="STAGE", help="dry runs: hang STAGE")
    parser.add_argument("--oom-above", type=int, default=None, help="dry runs: lengths above this run out of memory")
    parser.add_argument("--stages", type=lambda text: text.split(","), default=None, help="run only these (a,b,...)")
    parser.add_argument("--budget", type=int, default=None, help="seconds for all stages (GPU default: 450)")
    args = parser.parse_args(argv)
    args.lengths = [32, 64] if args.dry else [2048, 4096, 8192]
    args.steps, args.search_limit, args.granularity = (2, 128, 16) if args.dry else (4, 131072, 1024)
    gpu = torch.cuda.is_available()
    if not gpu and not args.dry:
        raise SystemExit("no CUDA GPU: run with --dry for the CPU rehearsal")
    if not args.dry and (args.simulate_crash or args.simulate_hang or args.oom_above):
        raise SystemExit("--simulate-* and --oom-above are for dry runs")
    if gpu:  # the check is about a 24 GB card, whatever this one holds
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_BYTES / total))
    device = torch.cuda.get_device_name() if gpu else "cpu (dry run)"
    today = date.today().isoformat()
    # A dry run proves the benchmark works; its numbers are not results, so they stay out of the repository.
    # QLORA_PIPE_RESULTS: a folder that outlives the machine (a lent GPU's returned folder, a shared disk).
    env_dir = Path(os.environ["QLORA_PIPE_RESULTS"]) if os.environ.get("QLORA_PIPE_RESULTS") else None
    out_dir = args.out or env_dir or (Path(tempfile.gettempdir()) if args.dry else REPO / "benchmarks/results")
    name = "gpu-dry.json" if args.dry else f"gpu-{today}-{device.split()[-1].lower()}.json"
    header = {
        "date": today,
        "device": device,
        "memory_cap_bytes": CAP_BYTES if gpu else None,
        "command": COMMAND + (" --dry" if args.dry else ""),
        "dry": args.dry,
        "flops_convention": "QLoRA model FLOPs per token, benchmarks/flops.py (no weight gradients for the frozen "
        "base; hfu adds the recompute of gradient checkpointing)",
        "references": REFERENCES,
    }
    if args.stages and set(args.stages) - set(STAGE_LIMITS):
        raise SystemExit(
            f"--stages: unknown {sorted(set(args.stages) - set(STAGE_LIMITS))}; known: {list(STAGE_LIMITS)}"
        )
    budget = args.budget or (None if args.dry else BUDGET_SECONDS)
    results = Results(out_dir / name, header, resume=args.resume, budget=budget)
    print_summary_on_signal(results)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        measure(args, Path(tmp), results)
    results.record("seconds", round(time.time() - started, 1))
    print(results.summary())
    print(headline(results.data))
    print(f"written: {results.path}")
    return 0
