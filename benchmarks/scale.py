"""One row of the scale table: a real model through train, verified export and a q8_0 GGUF, timed, with each
stage's host peak beside the planner's prediction.

    python -m benchmarks scale MODEL [--steps 4] [--micro-batch 2] [--max-length 256] [--out DIR] [--no-verify]

MODEL: a name `qlora-pipe get-model` knows (smollm2-135m-instruct, gemma3-270m, qwen2.5-coder-0.5b-instruct,
qwen2.5-coder-1.5b-instruct), a GGUF file or a model folder (a 7B written by `python -m benchmarks
random-model`). The recipe is recipes/smollm2-legal.yaml cut to --steps steps on 8 * micro batch rows of the
bundled legal data, with 4 held-out rows and no answer previews. Each stage runs as the user runs it (the
`qlora-pipe` CLI in its own process) and records its own host peak (summary.json, merged/export_info.json,
merged/fidelity.json); this command reads them back. The plan is `qlora-pipe plan`'s for the settings the
run resolved on this machine (fp32 on a CPU without native bf16), its allocated terms (no CUDA context), which
are what training holds beside the libraries. Prints a Markdown row; --out keeps the runs and a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python -m benchmarks scale"
GiB = 2**30


def recipe_for(model: Path, out: Path, steps: int, micro_batch: int, max_length: int) -> dict[str, Any]:
    raw = yaml.safe_load((REPO / "recipes/smollm2-legal.yaml").read_text())
    raw.update(run_name="scale", output_dir=str(out))
    raw["model"]["name_or_path"] = str(model)
    raw["data"].update(
        train_path=str(REPO / "data/legal-qa/train.jsonl"),
        eval_path=str(REPO / "data/legal-qa/eval.jsonl"),
        max_length=max_length,
        max_train_samples=8 * micro_batch,
        max_eval_samples=4,
        cache_dir=str(out / "data-cache"),
    )
    raw["training"].update(
        max_steps=steps,
        micro_batch_size=micro_batch,
        gradient_accumulation_steps=1,
        warmup_ratio=0.0,
        logging_steps=1,
        eval_steps=steps,
        save_steps=steps,
        preview_prompts=[],
        report_to=["none"],
    )
    return raw


def cli(*args: str) -> float:
    """Run `qlora-pipe ARGS` as a user does; its wall time in seconds. Exits with its code if it fails."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qlora_pipe.cli", *args], cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{COMMAND}: `qlora-pipe {' '.join(args)}` failed with exit code {done.returncode}")
    return time.perf_counter() - started


def step_seconds(run: Path) -> float | None:
    """Seconds per optimizer step: the trainer's run time less the evaluations inside it (those logged before
    its train_runtime line, the one before the first step included), over the steps."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    end = next((i for i, m in enumerate(lines) if "train_runtime" in m), None)
    if end is None or not lines[end].get("step"):
        return None
    evals = sum(m.get("eval_runtime", 0.0) for m in lines[:end])
    return (lines[end]["train_runtime"] - evals) / lines[end]["step"]


def planned(run: Path) -> dict[str, int]:
    from qlora_pipe.plan.advice import recipe_plan
    from qlora_pipe.recipe import load_recipe

    summary = json.loads((run / "summary.json").read_text())
    recipe = load_recipe(run / "recipe.resolved.yaml")
    length = recipe.data.max_length if isinstance(recipe.data.max_length, int) else 256
    plan = recipe_plan(recipe, None, micro_batch_size=summary["micro_batch_size"], max_length=length)
    return {"total": plan.total, "allocated": plan.allocated}


def libraries_anonymous() -> int | None:
    """Anonymous memory of a process that has only imported the training stack: what every stage holds before
    any model (the planner's terms are what comes on top)."""
    script = (
        "import torch, transformers, peft, trl, bitsandbytes, datasets\n"
        "from qlora_pipe.machine.host_memory import read_status\n"
        "print(read_status().get('RssAnon', 0))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    return int(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout.split() else None


def anonymous(report: dict | None) -> int | None:
    return report.get("peak_anonymous_bytes") if report else None


def gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / GiB:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", type=Path, help="keep the run and write scale.json here (default: a temporary folder)")
    parser.add_argument("--no-verify", action="store_true", help="export without the verification")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe value, as train's --set (data.chat_template=gemma for a base without a template)",
    )
    args = parser.parse_args(argv)

    from qlora_pipe.errors import UserError
    from qlora_pipe.models.examples import get_model

    path = Path(args.model).expanduser()
    try:
        model = path if path.exists() else get_model(args.model)
    except UserError as exc:
        print(f"{COMMAND}: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        recipe = out / "scale.yaml"
        raw = recipe_for(model, out, args.steps, args.micro_batch, args.max_length)
        recipe.write_text(yaml.safe_dump(raw))
        run = out / "scale"
        overrides = [item for value in args.set for item in ("--set", value)]  # train's own --set
        times = {"train": cli("train", str(recipe), "--overwrite", *overrides)}
        times["export"] = cli("export", str(run), *(["--no-verify"] if args.no_verify else []))
        gguf_args = ["export", str(run), "--format", "gguf", "--gguf-type", "q8_0"]
        times["gguf q8_0"] = cli(*gguf_args, *(["--no-verify"] if args.no_verify else []))
        summary = json.loads((run / "summary.json").read_text())
        export_info = json.loads((run / "merged/export_info.json").read_text())
        gguf = json.loads((run / "merged/fidelity.json").read_text())["gguf"]["q8_0"]
        memory = gguf.get("host_memory") or {}
        result = {
            "model": str(model),
            "params": summary["total_params"],
            "cpu_threads": summary["compute"]["cpu_threads"],
            "precision": summary["compute"]["precision"],
            "seconds": {k: round(v, 1) for k, v in times.items()},
            "seconds_per_step": step_seconds(run),
            "eval_loss": [summary["eval_loss_before"], summary["final_eval_loss"]],
            "host_peak_anonymous": {
                "train": anonymous(summary.get("host_memory")),
                "export": anonymous(export_info.get("host_memory")),
                "gguf converter": anonymous(memory.get("converter")),
                "gguf check": anonymous(memory.get("check")),
            },
            "planned": planned(run),
            "libraries_anonymous": libraries_anonymous(),
            "export_verified": not args.no_verify,
            "load_average": os.getloadavg()[0],
        }
        if args.out:
            (out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    peaks = result["host_peak_anonymous"]
    step = result["seconds_per_step"]
    print(
        "| model | params | s/step | train s | export s | GGUF s | host peak GiB: train / export / converter / check "
        "| planned allocated + libraries GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {Path(result['model']).name} | {result['params'] / 1e9:.2f}B | {'n/a' if step is None else f'{step:.1f}'} "
        f"| {times['train']:.0f} | {times['export']:.0f} | {times['gguf q8_0']:.0f} "
        f"| {gib(peaks['train'])} / {gib(peaks['export'])} / {gib(peaks['gguf converter'])} / "
        f"{gib(peaks['gguf check'])} | {gib(result['planned']['allocated'])} + {gib(result['libraries_anonymous'])} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
