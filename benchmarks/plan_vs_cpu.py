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

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python -m benchmarks plan-vs-cpu"
PROFILED_STEP = 1  # the second step: the optimizer's states exist, the first step's one-time work is done
# glibc serves allocations below its (dynamic, up to 32 MiB) mmap threshold from its heap and keeps what is freed
# there, so a process's memory overstates what torch holds (measured: 1.25 GiB for a step that holds 0.57 GiB);
# with the threshold fixed at 64 KiB every tensor of any size is mapped and returned when freed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# TRL 1.16's fused LM head without Triton (on a CPU) computes each [tokens x 32768] tile with torch ops: its
# backward (trl/kernels/chunked_logprob.py, _backward_tile) holds the scaled logits, the log-probabilities, the
# probabilities, the gradient and two temporaries beside the tile, each as large, where the GPU's Triton kernel
# holds the tile alone (the one the plan counts).
CPU_TILE_TEMPORARIES = 6


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


def compare(found: dict[str, Any], recipe, loss_tile: int = 4096) -> dict[str, Any]:
    """The plan's terms beside the measurement. The step is planned as on a GPU, and again with the CPU-only
    temporaries of TRL's LM head (``loss_tile`` tokens per tile, the tile this run used)."""
    from qlora_pipe.plan.advice import recipe_plan
    from qlora_pipe.plan.layer_bytes import layer_transient_bytes
    from qlora_pipe.plan.terms import VOCAB_TILE, loss_bytes

    batch, length = found["batch_shape"]
    plan = recipe_plan(recipe, None, micro_batch_size=batch, max_length=length)
    terms = dict(plan.terms)
    s = plan.settings
    planned_weights = sum(terms[name] for name in terms if name.startswith("base weights")) + terms["LoRA weights"]
    planned_states = sum(b for name, b in terms.items() if name.startswith("optimizer states"))
    held = terms["LoRA gradients"] + terms["activations kept"]
    layer = layer_transient_bytes(plan.shape, s)
    tile = min(batch * length, loss_tile) * VOCAB_TILE * s.compute_bytes
    loss = loss_bytes(plan.shape, batch * length, s.compute_bytes, loss_tile)
    loss_cpu = loss + CPU_TILE_TEMPORARIES * tile
    planned_step = held + max(layer, loss)
    weights = found["weights"]["quantized"] + found["weights"]["other"]
    rows = {
        "weights (4-bit + not quantized + LoRA)": (planned_weights, weights),
        "optimizer states": (planned_states, found["optimizer_states"]),
        "step peak (gradients + activations + transient)": (planned_step, found["step_peak"]),
    }
    total_planned = planned_weights + planned_states + planned_step
    total_measured = weights + found["optimizer_states"] + found["step_peak"]
    rows["step peak + the CPU's LM-head tile temporaries"] = (held + max(layer, loss_cpu), found["step_peak"])
    rows["allocated in all"] = (total_planned, total_measured)
    return {
        "settings": {
            "micro_batch_size": batch,
            "tokens_per_row": length,
            "precision": s.precision,
            "compute_bytes": s.compute_bytes,
            "optimizer": s.optimizer,
            "tiled_mlp": s.tiled_mlp,
            "lora_dropout": s.lora_dropout,
            "loss_token_tile": loss_tile,
        },
        "rows": {
            name: {"planned": p, "measured": m, "difference": (p - m) / m if m else None}
            for name, (p, m) in rows.items()
        },
        "step_parts": {
            "gradients + activations kept": held,
            "layer backward": layer,
            "loss (GPU)": loss,
            "loss with the CPU's tile temporaries": loss_cpu,
        },
        "plan_terms": terms,
    }


def measured_of(result: dict[str, Any]) -> dict[str, Any]:
    """What a result measured (its planned side aside), as ``compare`` takes it."""
    rows = result["rows"]
    weights = rows["weights (4-bit + not quantized + LoRA)"]["measured"]
    return {
        "batch_shape": [result["settings"]["micro_batch_size"], result["settings"]["tokens_per_row"]],
        "weights": {"quantized": weights, "other": 0},
        "optimizer_states": rows["optimizer states"]["measured"],
        "step_peak": rows["step peak (gradients + activations + transient)"]["measured"],
    }


def replan(path: Path) -> dict[str, Any]:
    """A result's measurement against the planner as it is now (the measurement is not repeated)."""
    from qlora_pipe.recipe import validate_recipe

    result = json.loads(path.read_text())
    recipe = validate_recipe(result["recipe"], str(path))
    kept = {k: v for k, v in result.items() if k not in ("rows", "step_parts", "plan_terms", "settings")}
    return compare(measured_of(result), recipe, result["settings"]["loss_token_tile"]) | kept


def table(result: dict[str, Any]) -> str:
    lines = [f"{'':50s} {'planned':>11s} {'measured':>11s} {'difference':>10s}"]
    for name, row in result["rows"].items():
        diff = "" if row["difference"] is None else f"{100 * row['difference']:+.1f}%"
        lines.append(f"{name:50s} {row['planned'] / 2**30:8.3f} GiB {row['measured'] / 2**30:8.3f} GiB {diff:>10s}")
    return "\n".join(lines)


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
