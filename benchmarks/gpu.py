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
import gc
import json
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_model import REFERENCES, build_4bit_llama, llama_config, peak_bf16_flops

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python -m benchmarks gpu"

# "24 GB" as a 24 GiB card leaves it to PyTorch after the CUDA context and cuBLAS workspaces (about 1.6 GiB).
CAP_BYTES = 24 * 10**9


def default_recipe(tmp: Path, max_length: int, **switches: Any):
    """qlora-pipe's defaults (r 16 on all linear layers, paged 8-bit AdamW, bf16, checkpointing, batch 1),
    with optional training switches (e.g. activation_offloading=True)."""
    from qlora_pipe.recipe import validate_recipe

    raw = {
        "run_name": "gpu-check",
        "output_dir": str(tmp / "runs"),
        "model": {"name_or_path": "random-llama-3.1-8b-shape"},
        "data": {"train_path": str(REPO / "data/legal-qa/train.jsonl"), "max_length": max_length},
        "training": {
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "report_to": ["none"],
            "save_steps": 10**6,
            **switches,
        },
    }
    return validate_recipe(raw, "gpu-check")


def planned_bytes(recipe, config, length: int) -> dict[str, int] | None:
    """The memory planner's prediction: ``allocated`` is what torch.cuda.max_memory_allocated should
    report (no CUDA context, allocator slack or paged optimizer states); ``total`` is the whole peak."""
    try:
        from qlora_pipe.plan.advice import plan_for_recipe

        plan = plan_for_recipe(recipe, config=config.to_dict(), micro_batch_size=1, max_length=length)
        return {"allocated": int(plan.allocated), "total": int(plan.total), "terms": dict(plan.terms)}
    except Exception as exc:  # a planner failure must not lose the measurements: record why
        print(f"  planner: no prediction ({type(exc).__name__}: {exc})", flush=True)
        return None


def random_rows(length: int, rows: int, vocab: int):
    from datasets import Dataset

    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(length)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


class StepTimer:
    """Step times from the trainer's own callbacks; the first step (allocations, autotuning) is dropped."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                sync()
                timer.begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync()
                timer.times.append(time.perf_counter() - timer.begin)

        self.callback = Callback()
        self.times: list[float] = []
        self.begin = 0.0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_steps(model, tokenizer, tmp: Path, length: int, steps: int, vocab: int, **switches) -> dict[str, Any]:
    """``steps`` optimizer steps at this length through build_trainer; raises torch.OutOfMemoryError."""
    from qlora_pipe.data.prepared import PreparedData
    from qlora_pipe.runs import RunDir
    from qlora_pipe.training.micro_batch import BatchChoice
    from qlora_pipe.training.stage import build_trainer

    recipe = default_recipe(tmp, length, **switches)
    recipe.training.max_steps = steps
    run = RunDir(recipe.run_dir())
    run.root.mkdir(parents=True, exist_ok=True)
    data = PreparedData(random_rows(length, steps, vocab), None, [], None)
    timer = StepTimer()
    trainer = build_trainer(recipe, run, model, tokenizer, data, (timer.callback,), BatchChoice(1, 1))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    finally:
        trainer.optimizer = trainer.lr_scheduler = None  # the next length starts from empty optimizer state
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    step = sorted(timer.times[1:] or timer.times)[len(timer.times[1:] or timer.times) // 2]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"step_seconds": step, "tokens_per_second": length / step, "peak_memory_bytes": peak}


def fits(model, tokenizer, tmp: Path, length: int, vocab: int) -> bool:
    try:
        train_steps(model, tokenizer, tmp, length, 1, vocab)
        return True
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return False


def longest_fitting(model, tokenizer, tmp: Path, start: int, limit: int, granularity: int, vocab: int) -> dict:
    """Double from a length that fits until one does not (or ``limit``), then bisect to ``granularity``."""
    good, bad, tried = start, None, []
    while bad is None and good < limit:
        trial = min(good * 2, limit)
        ok = fits(model, tokenizer, tmp, trial, vocab)
        tried.append({"length": trial, "fits": ok})
        good, bad = (trial, None) if ok else (good, trial)
    while bad is not None and bad - good > granularity:
        trial = (good + bad) // 2 // granularity * granularity
        ok = fits(model, tokenizer, tmp, trial, vocab)
        tried.append({"length": trial, "fits": ok})
        good, bad = (trial, bad) if ok else (good, trial)
    return {"longest_fitting_length": good, "first_failing_length": bad, "search_limit": limit, "tried": tried}


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
            gc.collect()
            torch.cuda.empty_cache()
            row["skipped"] = "out of memory"
        rows.append(row)
        outcome = row.get("skipped") or f"{row['tokens_per_second']:.0f} tokens/s, peak {row['peak_memory_bytes']}"
        print(f"  {name}: {outcome}", flush=True)
    return rows


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from qlora_pipe.model import add_lora
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
    rows = []
    for length in args.lengths:
        result = train_steps(trainable.model, tokenizer, tmp, length, args.steps, config.vocab_size)
        # PaLM's model FLOPs: 6 N per token for the matmuls + 12 L d T per token for attention scores
        flops = (6 * params + 12 * config.num_hidden_layers * config.hidden_size * length) * length
        result.update(
            length=length,
            model_flops_per_step=flops,
            mfu=flops / result["step_seconds"] / peak_flops if peak_flops else None,
            planned=planned_bytes(default_recipe(tmp, length), config, length),
        )
        rows.append(result)
        print(f"  {length}: {result['tokens_per_second']:.0f} tokens/s, peak {result['peak_memory_bytes']}", flush=True)
    search = longest_fitting(
        trainable.model, tokenizer, tmp, max(args.lengths), args.search_limit, args.granularity, config.vocab_size
    )
    return {
        "model": {**config.to_diff_dict(), "parameters_counted": params, "build_seconds": round(built, 1)},
        "trainable_params": trainable.trainable_params,
        "peak_bf16_flops": peak_flops,
        "lengths": rows,
        "longest_sequence": search,
        "switches": measure_switches(trainable.model, tokenizer, tmp, args, config),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny shapes on CPU, a few steps, seconds")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    args.lengths = [32, 64] if args.dry else [2048, 4096, 8192]
    args.steps, args.search_limit, args.granularity = (2, 128, 16) if args.dry else (4, 131072, 1024)
    gpu = torch.cuda.is_available()
    if not gpu and not args.dry:
        raise SystemExit("no CUDA GPU: run with --dry for the CPU rehearsal")
    if gpu:  # the check is about a 24 GB card, whatever this one holds
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_BYTES / total))
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, Path(tmp))
    device = torch.cuda.get_device_name() if gpu else "cpu (dry run)"
    result = {
        "date": date.today().isoformat(),
        "device": device,
        "memory_cap_bytes": CAP_BYTES if gpu else None,
        "command": COMMAND + (" --dry" if args.dry else ""),
        "dry": args.dry,
        **result,
        "references": REFERENCES,
        "seconds": round(time.time() - started, 1),
    }
    # A dry run proves the benchmark works; its numbers are not results, so they stay out of the repository.
    out_dir = args.out or (Path(tempfile.gettempdir()) if args.dry else REPO / "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu-dry.json" if args.dry else f"gpu-{result['date']}-{device.split()[-1].lower()}.json"
    (out_dir / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out_dir / name}")
    return 0
