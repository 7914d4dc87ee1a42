"""The fine-tuning methods side by side, measured: same model, data, steps and seed, one invocation.

    python -m benchmarks methods [--model models/quickstart-base --steps 60]

Full fine-tuning, prompt tuning, prefix tuning, (IA)³, LoRA, QLoRA and DoRA (PEFT 0.21), each trained
in its own process by benchmarks/method_runs.py on the bundled legal-qa rows (the data stage's own
rendering and masking), then: trainable parameters, peak training memory (process RSS), storage per
task, generation latency beside the base unmerged and merged, what the architecture keeps of it, and
held-out eval loss after the same budget. Bottleneck adapters (the `adapters` library) cannot be
installed beside this stack and are listed with the reason. Writes benchmarks/results/methods-<date>.json
and prints the table (markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python -m benchmarks methods"
# Checked with `pip install --dry-run adapters` on 2026-11-30: adapters 1.3.0 requires transformers~=4.57.6.
ADAPTERS_REASON = "not measured: the adapters library (1.3.0) requires transformers~=4.57.6; this stack pins {tf}"
MiB = 2**20


def prepared_rows(model_dir: str, max_length: int, train_rows: int, eval_rows: int) -> tuple[list, list, Any]:
    """The bundled legal-qa rows as the data stage renders and masks them for this model's template."""
    from transformers import AutoTokenizer

    from qlora_pipe.data.prepare import prepare_data
    from qlora_pipe.recipe import validate_recipe

    raw = {
        "run_name": "methods",
        "model": {"name_or_path": model_dir},
        "data": {
            "train_path": str(REPO / "data/legal-qa/train.jsonl"),
            "eval_path": str(REPO / "data/legal-qa/eval.jsonl"),
            "max_length": max_length,
            "max_train_samples": train_rows,
            "max_eval_samples": eval_rows,
            "cache_dir": tempfile.mkdtemp(prefix="methods-cache-"),
        },
    }
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_data(validate_recipe(raw, "methods").data, tokenizer, 42)
    pick = lambda split: [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in split]  # noqa: E731
    return pick(data.train), pick(data.eval), tokenizer


def settings_for(args: argparse.Namespace, tokenizer, model_dir: str) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("accelerate").init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    text = (REPO / "data/legal-qa/corpus.txt").read_text(encoding="utf-8")
    prompt = tokenizer(text[: 20 * args.prompt_tokens], add_special_tokens=False)["input_ids"][: args.prompt_tokens]
    return {
        "seed": 42,
        "steps": args.steps,
        "micro_batch_size": args.micro_batch_size,
        "pad_token_id": tokenizer.pad_token_id,
        "total_params": sum(p.numel() for p in skeleton.parameters()),
        "prompt_ids": prompt,
        "new_tokens": args.new_tokens,
        "latency_repeats": args.latency_repeats,
    }


def run_all(args: argparse.Namespace, keys: list[str]) -> dict[str, Any]:
    from benchmarks.method_runs import run_method

    train, held_out, tokenizer = prepared_rows(args.model, args.max_length, args.train_rows, args.eval_rows)
    settings = settings_for(args, tokenizer, args.model)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        job = Path(folder) / "job.json"
        job.write_text(json.dumps({"train": train, "eval": held_out, "settings": settings, "model": args.model}))
        for key in keys:
            print(f"method: {key}", flush=True)
            if args.in_process:
                results[key] = run_method(key, args.model, train, held_out, settings)
                continue
            out = Path(folder) / f"{key}.json"
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
            command = [sys.executable, "-m", "benchmarks.methods", "--worker", key, str(job), str(out)]
            subprocess.run(command, check=True, cwd=REPO, env=env)
            results[key] = json.loads(out.read_text())
    return {"settings": {k: v for k, v in settings.items() if k != "prompt_ids"}, "methods": results}


def worker(key: str, job: Path, out: Path) -> int:
    from benchmarks.method_runs import run_method

    spec = json.loads(job.read_text())
    out.write_text(json.dumps(run_method(key, spec["model"], spec["train"], spec["eval"], spec["settings"])))
    return 0


def table(result: dict[str, Any]) -> str:
    """The method table in the explainer's shape, every column measured (or the reason it is not)."""
    head = (
        "| method | trainable parameters | peak training memory (RSS) | storage per task | ms/token unmerged "
        "(base) | ms/token merged | architecture changes | eval loss after (before) |"
    )
    lines = [head, "|" + "---|" * 8]
    for row in result["methods"].values():
        merged = f"{row['ms_per_token_merged']:.1f}" if row["ms_per_token_merged"] is not None else "not mergeable"
        lines.append(
            f"| {row['method']} | {row['trainable_params']:,} ({row['trainable_percent']:.2f}%) "
            f"| {row['peak_rss_bytes'] / MiB:.0f} MiB | {row['storage_bytes'] / 1024:,.0f} KiB "
            f"| {row['ms_per_token_unmerged']:.1f} ({row['ms_per_token_base']:.1f}) | {merged} "
            f"| {row['architecture_change']} | {row['eval_loss_after']:.3f} ({row['eval_loss_before']:.3f}) |"
        )
    lines.append(f"| bottleneck adapters | {result['adapters']} | | | | | yes: layers added in series | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1], Path(argv[2]), Path(argv[3]))
    from benchmarks.method_runs import METHODS
    from qlora_pipe.machine.hardware import machine_description

    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models/quickstart-base"), help="a local causal LM folder")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--train-rows", type=int, default=None)
    parser.add_argument("--eval-rows", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--latency-repeats", type=int, default=15)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--in-process", action="store_true", help="all methods in this process (faster; tests)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        hint = "python scripts/build_quickstart_model.py"
        print(f"{COMMAND}: --model {args.model}: no model there ({hint})", file=sys.stderr)
        return 2
    keys = [k for k in args.methods.split(",") if k]
    unknown = sorted(set(keys) - set(METHODS))
    if unknown:
        print(f"{COMMAND}: --methods: unknown {', '.join(unknown)} (known: {', '.join(METHODS)})", file=sys.stderr)
        return 2
    from importlib.metadata import version

    started = time.time()
    result = {
        "date": date.today().isoformat(),
        "machine": machine_description(),
        "command": " ".join([COMMAND, *argv]),
        "versions": {n: version(n) for n in ("torch", "transformers", "peft", "bitsandbytes")},
        **run_all(args, keys),
        "adapters": ADAPTERS_REASON.format(tf=version("transformers")),
    }
    result["bench_seconds"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"methods-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
