"""Every performance claim of qlora-pipe, measured side by side in one invocation.

    python -m benchmarks cpu                     # CPU: < 10 minutes on 2 cores
    python -m benchmarks gpu [--dry]             # the GPU check (benchmarks/gpu.py; --dry: tiny, on CPU)
    python -m benchmarks docs benchmarks/results/<date>-<machine>.json   # regenerate docs/performance.md

CPU mode builds a Llama-shaped model with random weights (hidden and intermediate multiples of 64,
as bitsandbytes' CPU kernels need) and the quickstart tokenizer, then measures on the bundled data:

1. our training path (run_training: PipeTrainer and its callbacks) vs a plain TRL + PEFT + bitsandbytes
   script: steady-state step time (median of --repeats repeats of --steps steps, alternating sides, with the
   spread of the repeats and of the per-repeat ratio), tokens/s and peak memory; the sha256 of every batch
   each side trained on must match, list against list (benchmarks/batches.py), or the benchmark fails;
2. QLoRA (4-bit NF4) vs 16-bit LoRA vs full fine-tuning: peak memory, trainable parameters, bytes saved per task,
   supervised tokens counted in the batches trained on (the same batches: hashed and compared too);
3. generation latency of the merged model vs the base (same architecture: no added latency) and the
   unmerged adapter on the 16-bit base, interleaved;
4. export: our streaming export vs load + merge_and_unload + save (benchmarks/export_memory.py).

Each measurement runs in its own process (benchmarks/workers.py), so peak RSS belongs to one side.
Writes benchmarks/results/<date>-<machine>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from benchmarks.batches import check_same_batches
from qlora_pipe.machine.hardware import machine_description

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks/results"
WORKERS = "benchmarks.workers"  # run as python -m benchmarks.workers from the repository root
COMMAND = "python -m benchmarks cpu"
MICRO_BATCH = 8  # benchmarks.workers.SETTINGS["micro_batch_size"]
TRAIN = REPO / "data/legal-qa/train.jsonl"


def machine_name() -> str:
    """A short file-name-safe machine label, e.g. cpu2 or h200."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name().split()[-1].lower().replace(" ", "-")
    return f"cpu{os.cpu_count()}"


def build_train_model(folder: Path, hidden: int, layers: int) -> tuple[Path, int]:
    """A random-weight Llama with the quickstart tokenizer (vocab 2048), saved in bf16."""
    import torch

    from qlora_pipe.quickstart.builder import BaseSpec, build_tokenizer, make_model

    spec = BaseSpec(
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_layers=layers,
        num_heads=hidden // 64,
        num_kv_heads=max(1, hidden // 256),
    )
    torch.manual_seed(0)
    tokenizer = build_tokenizer((REPO / "data/legal-qa/corpus.txt").read_text(encoding="utf-8"), spec.vocab_size)
    model = make_model(spec, len(tokenizer)).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


def run_worker(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """One measurement in a fresh process; its last line carries the JSON result."""
    pythonpath = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": pythonpath}
    out = subprocess.run(
        [sys.executable, "-m", WORKERS, kind, json.dumps(args)], capture_output=True, text=True, env=env, cwd=REPO
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"bench worker {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("BENCH_RESULT "))


def tokens_per_second(run: dict[str, Any], clock: str = "train_seconds") -> float:
    return run["supervised_tokens"] / run[clock]


def rows_for(steps: int) -> int:
    """Rows for one epoch of ``steps`` steps where the bundled data allows; past it, more epochs."""
    available = sum(1 for line in TRAIN.read_text(encoding="utf-8").splitlines() if line.strip())
    return min(steps * MICRO_BATCH, available)


def compare_trainers(model: Path, tmp: Path, steps: int, repeats: int, max_length: int) -> dict[str, Any]:
    """Ours vs plain TRL, alternating which goes first so drift on a shared machine hits both sides."""
    from benchmarks.report import trainer_noise

    rows = rows_for(steps)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "plain": []}
    for i in range(repeats):
        for kind in ("ours", "plain") if i % 2 == 0 else ("plain", "ours"):
            out = tmp / f"{kind}-{i}"
            args = {"model": str(model), "out": str(out), "rows": rows, "max_length": max_length, "max_steps": steps}
            runs[kind].append(run_worker(kind, args))
            last = runs[kind][-1]
            per_step = last["steady_seconds"] / last["steady_steps"]
            print(f"  {kind} #{i + 1}: {tokens_per_second(last):.1f} tokens/s, {per_step:.3f} s/step", flush=True)
    # The sha256 of every batch each side trained on, list against list: the same tokens in the same order.
    batches = check_same_batches(runs)
    noise = trainer_noise(runs)
    print(f"  same {batches['batches']} batches on both sides; ratio ours / plain {noise['verdict']}", flush=True)
    # Other load on the machine only ever adds time, so each side's fastest repeat is kept as well.
    fastest = {kind: min(r["steady_seconds"] / r["steady_steps"] for r in rs) for kind, rs in runs.items()}
    speed = {kind: statistics.median(tokens_per_second(r) for r in rs) for kind, rs in runs.items()}
    cpu = {kind: statistics.median(tokens_per_second(r, "train_cpu_seconds") for r in rs) for kind, rs in runs.items()}
    peak = {kind: statistics.median(r["peak_memory_bytes"] for r in rs) for kind, rs in runs.items()}
    return {
        "repeats": repeats,
        "rows": rows,
        "steps": steps,
        "same_batches": True,  # check_same_batches raised otherwise
        **batches,
        **noise,
        "fastest_repeat_ratio_ours_over_plain": fastest["plain"] / fastest["ours"],
        "ours_tokens_per_second": speed["ours"],
        "plain_tokens_per_second": speed["plain"],
        "ratio_ours_over_plain": speed["ours"] / speed["plain"],
        # Tokens per CPU-second: unaffected by other jobs on a shared machine taking cores away.
        "ours_tokens_per_cpu_second": cpu["ours"],
        "plain_tokens_per_cpu_second": cpu["plain"],
        "cpu_time_ratio_ours_over_plain": cpu["ours"] / cpu["plain"],
        "ours_peak_memory_bytes": peak["ours"],
        "plain_peak_memory_bytes": peak["plain"],
        "runs": runs,
    }


def compare_methods(model: Path, tmp: Path, steps: int, max_length: int) -> dict[str, Any]:
    """QLoRA vs 16-bit LoRA vs full fine-tuning: the same short run on the same batches, each in its own process."""
    common = {"model": str(model), "rows": rows_for(steps), "max_length": max_length, "max_steps": steps}
    qlora = run_worker("ours", {**common, "out": str(tmp / "m-qlora")})
    lora = run_worker("ours", {**common, "out": str(tmp / "m-lora"), "quantized": False})
    full = run_worker("full", {**common, "out": str(tmp / "m-full")})
    methods = {"qlora_nf4": qlora, "lora_bf16": lora, "full_bf16": full}
    # supervised_tokens: counted in the batches each run trained on (identical: checked here).
    batches = check_same_batches({key: [run] for key, run in methods.items()})
    for run in methods.values():
        run["trainable_percent"] = 100 * run["trainable_params"] / run["total_params"]
    return {"steps": steps, "batches": batches["batches"], "batch_digest": batches["batch_digest"], "methods": methods}


def bench_export_and_latency(tmp: Path, hidden: int, layers: int, repeats: int) -> dict[str, Any]:
    """Export (reusing benchmarks.export_memory) then latency of base vs our merged output vs the unmerged adapter."""
    from benchmarks import export_memory as bem

    base_dir, run_dir, size = bem.build(tmp / "export", hidden, layers)
    merged = tmp / "export" / "merged-ours"
    measured = bem.compare(base_dir, run_dir, tmp, merged)
    export = {"hidden": hidden, "layers": layers, "model_bytes_bf16": size, **measured}
    args = {"base": str(base_dir), "merged": str(merged), "adapter": str(run_dir)}
    latency = run_worker("latency", {**args, "repeats": repeats, "prompt_tokens": 64, "new_tokens": 32})
    return {"export": export, "latency": {"repeats": repeats, "prompt_tokens": 64, "new_tokens": 32, **latency}}


def cpu_bench(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    started = time.time()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model, params = build_train_model(tmp / "model", args.hidden, args.layers)
        print(f"model: hidden {args.hidden}, {args.layers} layers, {params / 1e6:.1f}M parameters", flush=True)
        print("1/4 ours vs plain TRL", flush=True)
        trainers = compare_trainers(model, tmp, args.steps, args.repeats, args.max_length)
        print("2/4 QLoRA vs LoRA vs full fine-tuning", flush=True)
        methods = compare_methods(model, tmp, args.method_steps, args.max_length)
        print("3/4 + 4/4 export and latency", flush=True)
        tail = bench_export_and_latency(tmp, args.export_hidden, args.export_layers, args.latency_repeats)
    return {
        "date": date.today().isoformat(),
        "machine": machine_description(),
        "command": " ".join([COMMAND, *argv]),
        "versions": versions(),
        "train_model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "parameters": params,
            "max_length": args.max_length,
        },
        "trainers": trainers,
        "methods": methods,
        **tail,
        "bench_seconds": round(time.time() - started, 1),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "bitsandbytes", "trl")}


def write_results(result: dict[str, Any], folder: Path = RESULTS) -> Path:
    from benchmarks.report import markdown_table, plot

    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{result['date']}-{machine_name()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown_table(result))
    plot(result, stem.with_suffix(".png"))
    return stem.with_suffix(".json")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run the GPU check (= python -m benchmarks gpu)")
    parser.add_argument("--dry", action="store_true", help="with --gpu: tiny shapes on CPU, seconds")
    parser.add_argument(
        "--docs", "--readme", dest="docs", type=Path, help="rewrite docs/performance.md from this results file"
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument(
        "--steps",
        type=int,
        default=45,
        help="ours vs plain TRL: optimizer steps per repeat (micro batch 8: steps x 8 of the 363 bundled rows, "
        "one epoch; more epochs past 45). More steps: a smaller spread between repeats (default: 45)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="ours vs plain TRL: repeats per side, alternating (default: 5)"
    )
    parser.add_argument("--method-steps", type=int, default=3, help="QLoRA vs LoRA vs full: steps (default: 3)")
    parser.add_argument("--export-hidden", type=int, default=1024)
    parser.add_argument("--export-layers", type=int, default=8)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.steps < 3 or args.repeats < 2:
        parser.error("--steps must be at least 3 and --repeats at least 2: the spread needs them")
    if args.docs:
        from benchmarks.report import update_docs

        update_docs(args.docs)
        return 0
    if args.gpu:
        from benchmarks.gpu import main as gpu_main

        return gpu_main(["--dry"] if args.dry else [])
    path = write_results(cpu_bench(args, argv), args.out)
    print(path.with_suffix(".md").read_text())
    print(f"written: {path} (+ .md, .png)")
    return 0
