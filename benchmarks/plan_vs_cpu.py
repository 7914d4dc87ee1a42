"""The planner's terms against what torch allocates in one real training step on this CPU.

    python -m benchmarks plan-vs-cpu MODEL [--micro-batch 2] [--max-length 512] [--document] [--set KEY=VALUE]
        [--out FILE.json]

MODEL: a name `qlora-pipe get-model` knows (qwen2.5-coder-0.5b-instruct, ...), a GGUF file or a model folder.
A real run of the bundled legal recipe (recipes/smollm2-legal.yaml: NF4 with double quantization, LoRA r=16 on
every linear layer, gradient checkpointing, paged_adamw_8bit; rows packed to --max-length) trains two steps on
this machine. Its second step (forward, backward and optimizer step) is measured above the memory at its
start: by default from the process's anonymous memory sampled every 2 ms, with glibc's mmap threshold fixed
at 64 KiB (the command starts itself again with MALLOC_MMAP_THRESHOLD_) so that every freed tensor goes back
to the system at once, and what the first step left in glibc's heap given back before; with --profiler from
PyTorch's profiler, every CPU allocation and free with its size (exact, what torch.cuda.max_memory_allocated
gives for a GPU step, but the profiler's own events take gigabytes on long steps). Beside it: the loaded
model's weight bytes (4-bit data with their quantization constants, counted once) and the optimizer's state
tensors. The plan is the one `qlora-pipe plan` makes for the settings the run resolved on this machine
(precision, compute dtype) and the batch's actual shape, so the bytes are those a GPU would hold for the same
settings.

--document: long-context steps. Every row is one document of --max-length tokens (the bundled legal answers
joined one after the other, a text row, cut at max_length; no packing: the attention has no mask, as a real
long document has), so the step runs exactly one sequence of that length per row. --set KEY=VALUE: a recipe
override (training.tiled_mlp=true, lora.dropout=0, ...), as `qlora-pipe train --set` takes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.plan_vs_cpu_report import compare, replan, table

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python -m benchmarks plan-vs-cpu"
PROFILED_STEP = 1  # the second step: the optimizer's states exist, the first step's one-time work is done
# glibc serves allocations below its (dynamic, up to 32 MiB) mmap threshold from its heap and keeps what is freed
# there, so a process's memory overstates what torch holds (measured: 1.25 GiB for a step that holds 0.57 GiB);
# with the threshold fixed at 64 KiB every tensor of any size is mapped and returned when freed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def model_path(name: str) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        return path
    from qlora_pipe.models.examples import get_model

    return get_model(name)


def write_documents(path: Path, rows: int, max_length: int) -> Path:
    """``rows`` text rows, each the bundled answers joined until it is surely longer than ``max_length`` tokens."""
    answers = [json.loads(line)["messages"][-1]["content"] for line in (REPO / "data/legal-qa/train.jsonl").open()]
    text = " ".join(answers)
    while len(text) < 6 * max_length:  # fewer than 6 characters per token in English prose
        text += " " + text
    with path.open("w") as out:
        for i in range(rows):
            out.write(json.dumps({"text": f"Document {i}. " + text[: 6 * max_length]}) + "\n")
    return path


def recipe_for(
    model: Path, out: Path, micro_batch: int, max_length: int, document: bool = False, sets: tuple[str, ...] = ()
) -> dict[str, Any]:
    raw = yaml.safe_load((REPO / "recipes/smollm2-legal.yaml").read_text())
    raw.update(run_name="plan-vs-cpu", output_dir=str(out))
    raw["model"]["name_or_path"] = str(model)
    raw["data"].update(
        train_path=str(REPO / "data/legal-qa/train.jsonl"),
        eval_path=None,
        max_length=max_length,
        max_train_samples=None,
        packing=True,  # every micro batch filled to max_length, so the terms are measured at that length
        cache_dir=str(out / "data-cache"),
    )
    if document:
        rows = micro_batch * (PROFILED_STEP + 1)
        raw["data"].update(
            train_path=str(write_documents(out / "documents.jsonl", rows, max_length)),
            packing=False,
            overlength="truncate",
            loss_on="all",
        )
    raw["training"].update(
        max_steps=PROFILED_STEP + 1,
        micro_batch_size=micro_batch,
        gradient_accumulation_steps=1,
        logging_steps=1,
        save_steps=1000,
        preview_prompts=[],
    )
    from qlora_pipe.recipe.loading import apply_override

    for item in sets:
        apply_override(raw, item)
    return raw


def profiled_peak(prof) -> int:
    """Peak bytes allocated above the start of the recording, from the profiler's memory timeline."""
    from torch.profiler._memory_profiler import MemoryProfile

    current = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        current += size if action.name == "CREATE" else -size if action.name == "DESTROY" else 0
        peak = max(peak, current)
    return peak


class SampledStep:
    """The step's peak from the process's anonymous memory, sampled every 2 ms above its value at the start:
    no per-allocation record (the profiler's own events take gigabytes on a long step), and what glibc keeps
    after a free is counted, so it is an upper bound of what torch had allocated at once."""

    def __enter__(self):
        import ctypes

        from qlora_pipe.machine.host_memory import HostMemory, read_status

        # What the first step freed stays in glibc's heap and would be reused unseen: give it back first
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._start = read_status().get("RssAnon", 0)
        self._memory = HostMemory(interval_s=0.002).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._memory.__exit__(*exc)

    def peak(self) -> int:
        report = self._memory.report()
        return report["peak_anonymous_bytes"] - self._start if report else 0


class ProfiledStep:
    """The step's peak from PyTorch's profiler: every CPU allocation and free with its size (exact; memory-hungry
    on long sequences)."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)

    def peak(self) -> int:
        return profiled_peak(self._profile)


def step_recorder(measure: type):
    """A TrainerCallback recording the measured step, the batch's shape and the optimizer's state bytes."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.found: dict[str, Any] = {}
            self._profile = None
            self._hook = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step != PROFILED_STEP:
                return
            from qlora_pipe.plan.measure import measure_weight_bytes

            self.found["weights"] = measure_weight_bytes(model).__dict__

            def shape(module, args_, kwargs_):
                ids = kwargs_.get("input_ids") if kwargs_ else None
                if ids is not None and "batch_shape" not in self.found:
                    self.found["batch_shape"] = list(ids.shape)

            self._hook = model.register_forward_pre_hook(shape, with_kwargs=True)
            self._profile = measure().__enter__()
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if self._profile is None:
                return
            self._profile.__exit__(None, None, None)
            self._hook.remove()
            self.found["step_seconds"] = time.perf_counter() - self._started
            self.found["step_peak"] = self._profile.peak()
            self._profile = None
            states = 0
            for state_of in getattr(optimizer, "state", {}).values():
                states += sum(v.numel() * v.element_size() for v in state_of.values() if hasattr(v, "numel"))
            self.found["optimizer_states"] = states
            self.found["optimizer"] = type(getattr(optimizer, "optimizer", optimizer)).__name__

    return Recorder()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a get-model name, a GGUF file or a model folder")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", type=Path, help="write the comparison as JSON here too")
    parser.add_argument(
        "--profiler",
        action="store_true",
        help="measure the step with PyTorch's profiler (every allocation; exact, but it needs gigabytes of its own "
        "on long steps) instead of sampling the process's anonymous memory every 2 ms",
    )
    parser.add_argument("--replan", action="store_true", help="MODEL is a result JSON: plan its measurement again")
    parser.add_argument("--document", action="store_true", help="one long document per row (long-context steps)")
    parser.add_argument(
        "--loss-tile",
        type=int,
        default=4096,
        help="tokens per tile of TRL's fused LM head in this run (TRL's default 4096; smaller keeps its CPU-only "
        "temporaries below the layer terms on long documents)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override")
    args = parser.parse_args(argv)
    if args.replan:
        found = replan(Path(args.model))
        print(table(found))
        parts = ", ".join(f"{k} {v / 2**30:.3f} GiB" for k, v in found["step_parts"].items())
        print("planned parts of the step: " + parts)
        if args.out:
            args.out.write_text(json.dumps(found, indent=2) + "\n")
        return 0
    if not args.profiler and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        # glibc reads its settings when the process starts: start again with them
        argv = ["plan-vs-cpu", *(sys.argv[1:] if argv is None else argv)]
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *argv], {**os.environ, **MALLOC_ENV})

    from qlora_pipe.errors import UserError
    from qlora_pipe.machine.cpu_threads import choose_cpu_threads
    from qlora_pipe.recipe import load_recipe, validate_recipe
    from qlora_pipe.terminal import quiet_library_progress
    from qlora_pipe.training.stage import run_training

    quiet_library_progress()

    try:
        model = model_path(args.model)
    except UserError as exc:
        print(f"{COMMAND}: {exc}", file=sys.stderr)
        return 2
    recorder = step_recorder(ProfiledStep if args.profiler else SampledStep)
    from qlora_pipe.compat.trl import loss_token_tile

    with tempfile.TemporaryDirectory(prefix="plan-vs-cpu-") as tmp, loss_token_tile(args.loss_tile):
        started = time.perf_counter()
        result = run_training(
            validate_recipe(
                recipe_for(model, Path(tmp), args.micro_batch, args.max_length, args.document, tuple(args.set))
            ),
            callbacks=(recorder,),
        )
        resolved = load_recipe(result.run_dir.root / "recipe.resolved.yaml")
        found = compare(recorder.found, resolved, args.loss_tile)
        found["recipe"] = resolved.model_dump(mode="json", exclude={"source"})
    found.update(
        model=str(model),
        step_measured_by="profiler" if args.profiler else "anonymous memory sampled every 2 ms",
        optimizer_class=recorder.found.get("optimizer"),
        profiled_step_seconds=round(recorder.found["step_seconds"], 1),
        run_seconds=round(time.perf_counter() - started, 1),
        cpu_threads=choose_cpu_threads().threads,
    )
    print(
        f"{model.name}: step {PROFILED_STEP + 1} of a real run, batch {recorder.found['batch_shape']}, "
        f"{found['settings']['precision']} (optimizer {found['optimizer_class']})"
    )
    print(table(found))
    print("planned parts of the step: " + ", ".join(f"{k} {v / 2**30:.3f} GiB" for k, v in found["step_parts"].items()))
    print(f"the measured step took {found['profiled_step_seconds']} s")
    if args.out:
        args.out.write_text(json.dumps(found, indent=2) + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
