"""One trial of the GPU check: train a few steps at one sequence length through qlora-pipe's real trainer,
with its time per step, memory seen and the planner's prediction; and the search for the longest length
that fits (doubling, then bisection on out-of-memory)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def default_recipe(tmp: Path, max_length: int, lora_r: int | None = None, micro_batch: int = 1, **switches: Any):
    """qlora-pipe's defaults (r 16 on all linear layers, paged 8-bit AdamW, bf16, checkpointing, batch 1),
    with optional training switches (e.g. activation_offloading=True), another rank or micro batch."""
    from qlora_pipe.recipe import validate_recipe

    raw = {
        "run_name": "gpu-check",
        "output_dir": str(tmp / "runs"),
        "model": {"name_or_path": "random-llama-3.1-8b-shape"},
        **({"lora": {"r": lora_r, "alpha": 2 * lora_r}} if lora_r else {}),
        "data": {"train_path": str(REPO / "data/legal-qa/train.jsonl"), "max_length": max_length},
        "training": {
            "micro_batch_size": micro_batch,
            "gradient_accumulation_steps": 1,
            "report_to": ["none"],
            "save_steps": 10**6,
            # measured as set: the long-context switches are on only where a trial asks (gpu_long_context.py)
            "tiled_mlp": False,
            "activation_offloading": False,
            **switches,
        },
    }
    return validate_recipe(raw, "gpu-check")


def planned_bytes(recipe, config, length: int, micro_batch: int = 1) -> dict[str, int] | None:
    """The memory planner's prediction: ``allocated`` is what torch.cuda.max_memory_allocated should
    report (no CUDA context, allocator slack or paged optimizer states); ``total`` is the whole peak."""
    try:
        from qlora_pipe.plan.advice import plan_for_recipe

        plan = plan_for_recipe(recipe, config=config.to_dict(), micro_batch_size=micro_batch, max_length=length)
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


def train_steps(
    model, tokenizer, tmp: Path, length: int, steps: int, vocab: int, micro_batch: int = 1, **switches
) -> dict[str, Any]:
    """``steps`` optimizer steps of ``micro_batch`` full rows at this length through build_trainer (rows of
    random tokens exactly ``length`` long: what packing gives); raises torch.OutOfMemoryError."""
    from qlora_pipe.data.prepared import PreparedData
    from qlora_pipe.runs import RunDir
    from qlora_pipe.training.micro_batch import BatchChoice
    from qlora_pipe.training.stage import build_trainer

    recipe = default_recipe(tmp, length, micro_batch=micro_batch, **switches)
    recipe.training.max_steps = steps
    run = RunDir(recipe.run_dir())
    run.root.mkdir(parents=True, exist_ok=True)
    data = PreparedData(random_rows(length, steps * micro_batch, vocab), None, [], None)
    timer = StepTimer()
    trainer = build_trainer(recipe, run, model, tokenizer, data, (timer.callback,), BatchChoice(micro_batch, 1))
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
    return {"step_seconds": step, "tokens_per_second": micro_batch * length / step, **memory_seen()}


def memory_seen() -> dict[str, int | None]:
    """What the planner is checked against: the allocator's peak, its slack (reserved but never allocated)
    and the CUDA context (what the driver holds beyond the allocator's reservation)."""
    if not torch.cuda.is_available():
        return {"peak_memory_bytes": None, "allocator_slack_bytes": None, "cuda_context_bytes": None}
    free, total = torch.cuda.mem_get_info()
    peak = torch.cuda.max_memory_allocated()
    return {
        "peak_memory_bytes": peak,
        "allocator_slack_bytes": torch.cuda.max_memory_reserved() - peak,
        "cuda_context_bytes": (total - free) - torch.cuda.memory_reserved(),
    }


def planner_error_percent(planned: dict | None, peak: int | None) -> float | None:
    """(predicted allocated - measured peak) / measured peak, in percent; positive: the planner is high."""
    if not planned or not peak:
        return None
    return round(100 * (planned["allocated"] - peak) / peak, 1)


def release_after_oom() -> None:
    """Free what a failed trial held: called after the exception is gone (its traceback pins tensors),
    with the peak statistics reset, so one failed trial does not poison the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def fits(model, tokenizer, tmp: Path, length: int, vocab: int, oom_above: int | None = None, **switches) -> bool:
    try:
        if oom_above is not None and length > oom_above:  # dry runs: the search's failure path, on CPU
            raise torch.OutOfMemoryError(f"simulated: {length} tokens > {oom_above}")
        train_steps(model, tokenizer, tmp, length, 1, vocab, **switches)
        return True
    except torch.OutOfMemoryError:
        pass
    release_after_oom()
    return False


@dataclass
class Search:
    """Where the longest-length search starts and stops; ``tried`` may be a list the caller keeps on disk
    (``save`` after each trial), so a search cut short by its time limit still leaves what it measured."""

    start: int
    limit: int
    granularity: int
    oom_above: int | None = None
    tried: list[dict[str, Any]] = field(default_factory=list)
    save: Callable[[], None] = lambda: None


def longest_fitting(model, tokenizer, tmp: Path, vocab: int, search: Search, **switches) -> dict:
    """Double from a length that fits until one does not (or the limit), then bisect to the granularity."""
    good, bad, tried = search.start, None, search.tried

    def trial_fits(length: int) -> bool:
        ok = fits(model, tokenizer, tmp, length, vocab, search.oom_above, **switches)
        tried.append({"length": length, "fits": ok})
        search.save()
        return ok

    while bad is None and good < search.limit:
        trial = min(good * 2, search.limit)
        good, bad = (trial, None) if trial_fits(trial) else (good, trial)
    while bad is not None and bad - good > search.granularity:
        trial = (good + bad) // 2 // search.granularity * search.granularity
        good, bad = (trial, bad) if trial_fits(trial) else (good, trial)
    return {
        "longest_fitting_length": good,
        "first_failing_length": bad,
        "search_limit": search.limit,
        "tried": list(tried),
    }
