"""The three-way table: the trained model, the merged folder and each GGUF type, on one finished run.

    python -m benchmarks gguf runs/quickstart            # after `qlora-pipe export runs/quickstart`

Needs the gguf extra, `qlora-pipe setup-gguf`, and llama-cpp-python (built with `pip install
llama-cpp-python`; for q4_k_m too). Writes benchmarks/results/gguf-<date>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TYPES = ["f16", "bf16", "q8_0", "q4_k_m"]


def table(merged: dict, rows: dict[str, dict]) -> str:
    lines = [
        f"| model | file | eval loss (trained {merged['eval_loss_trained']:.4f}) "
        "| max / mean abs logit diff | top-1 agreement | greedy answers identical |",
        "|---|---|---|---|---|---|",
        f"| merged (transformers, bf16) | safetensors | {merged['eval_loss_merged']:.4f} "
        f"| {merged['max_abs_logit_diff']:.3f} / {merged['mean_abs_logit_diff']:.4f} "
        f"| {100 * merged['top1_agreement']:.1f}% | |",
    ]
    for gguf_type, row in rows.items():
        run = row["llama_cpp"]
        # The same 16 eval rows on both sides; the trained model's bf16 loss varies in the 4th digit between runs.
        assert abs(run["eval_loss_trained"] / merged["eval_loss_trained"] - 1) < 1e-3, "not the same rows"
        lines.append(
            f"| GGUF {gguf_type} (llama.cpp) | {row['bytes'] / 2**20:.1f} MiB | {run['eval_loss_llama_cpp']:.4f} "
            f"| {run['max_abs_logit_diff']:.3f} / {run['mean_abs_logit_diff']:.4f} "
            f"| {100 * run['top1_agreement']:.1f}% | {run['greedy_identical']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from qlora_pipe.export.gguf import check_gguf_type
    from qlora_pipe.export.gguf_command import export_gguf
    from qlora_pipe.machine.hardware import machine_description
    from qlora_pipe.runs import RunDir

    parser = argparse.ArgumentParser(prog="python -m benchmarks gguf", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished, exported run directory")
    parser.add_argument("--types", default=",".join(TYPES), help="GGUF types (comma-separated)")
    args = parser.parse_args(argv)
    run, merged = RunDir(args.run), args.run / "merged"
    fidelity = json.loads((merged / "fidelity.json").read_text())
    rows = {}
    for gguf_type in args.types.split(","):
        check_gguf_type(gguf_type)
        rows[gguf_type] = export_gguf(run, merged, gguf_type)
    result = {
        "date": date.today().isoformat(),
        "machine": machine_description(),
        "command": f"python -m benchmarks gguf {args.run}",
        "merged": {k: v for k, v in fidelity.items() if k != "gguf"},
        "gguf": rows,
    }
    out = REPO / f"benchmarks/results/gguf-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(result["merged"], rows))
    print(f"written: {out}")
    return 0
