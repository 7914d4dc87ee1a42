"""Every way to serve one finished run, each checked against the trained model on the same held-out rows.

    python -m benchmarks serving runs/smollm2-legal [--gguf f16,q8_0] [--skip-16bit]

Rows: the merged model in bf16 (the default export, into RUN/merged), fp16 and fp32 (written aside and
removed), served unmerged (the dequantized base + the PEFT adapter, transformers), and with the gguf extra
the merged GGUF types and the unmerged pair as GGUF (base + LoRA GGUF); llama.cpp's own numbers join each
GGUF row when llama-cpp-python is installed. Writes benchmarks/results/serving-<run>-<date>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def fidelity_row(name: str, fidelity: dict[str, Any], size: int | None, seconds: float) -> dict[str, Any]:
    kept = fidelity.get("delta_kept")
    return {
        "served as": name,
        "bytes": size,
        "seconds": round(seconds, 1),
        "eval_loss_trained": fidelity["eval_loss_trained"],
        "eval_loss_served": fidelity["eval_loss_merged"],
        "relative_loss_change": fidelity["relative_loss_change"],
        "relative_logit_diff": fidelity["relative_logit_diff"],
        "top1_agreement": fidelity["top1_agreement"],
        "delta_kept": kept if isinstance(kept, dict | str) else None,
        "passed": fidelity["passed"],
    }


def llama_cpp_row(name: str, size: int, runtime: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"served as": name, "bytes": size}
    if "top1_agreement" not in runtime:
        return {**row, "llama_cpp": runtime.get("skipped") or runtime.get("failed")}
    return {
        **row,
        "eval_loss_trained": runtime["eval_loss_trained"],
        "eval_loss_served": runtime["eval_loss_llama_cpp"],
        "relative_loss_change": runtime["relative_loss_change"],
        "relative_logit_diff": runtime["relative_logit_diff"],
        "top1_agreement": runtime["top1_agreement"],
        "greedy_identical": runtime["greedy_identical"],
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| served as | size | loss change | mean logit diff | top-1 agreement | delta kept (mean / worst) | greedy |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        size = f"{row['bytes'] / 2**20:.0f} MiB" if row.get("bytes") else ""
        if "relative_loss_change" not in row:
            lines.append(f"| {row['served as']} | {size} | {row.get('llama_cpp', '')} | | | | |")
            continue
        if row.get("refused"):
            lines.append(f"| {row['served as']} | {size} | refused: {row['refused']} | | | | |")
            continue
        kept = row.get("delta_kept")
        kept_text = f"{kept['mean']:.4f} / {kept['worst']:.4f}" if isinstance(kept, dict) else ("all" if kept else "")
        lines.append(
            f"| {row['served as']} | {size} | {100 * row['relative_loss_change']:+.3f}% "
            f"| {100 * row['relative_logit_diff']:.2f}% | {100 * row['top1_agreement']:.2f}% | {kept_text} "
            f"| {row.get('greedy_identical', '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from qlora_pipe.errors import UserError
    from qlora_pipe.export.command import export_merged
    from qlora_pipe.export.unmerged import export_unmerged
    from qlora_pipe.machine.hardware import machine_description
    from qlora_pipe.runs import RunDir

    parser = argparse.ArgumentParser(prog="python -m benchmarks serving", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run directory")
    parser.add_argument("--gguf", default="f16,q8_0", help="merged GGUF types (comma-separated; '' for none)")
    parser.add_argument("--skip-16bit", action="store_true", help="leave out the fp16 and fp32 merges")
    args = parser.parse_args(argv)
    run = RunDir(args.run)
    has_gguf = importlib.util.find_spec("gguf") is not None
    rows: list[dict[str, Any]] = []

    started = time.time()
    merged = export_merged(run.root)
    rows.append(
        fidelity_row("merged bf16 (default export)", merged.fidelity, folder_bytes(merged.out), time.time() - started)
    )
    if not args.skip_16bit:
        for dtype in ("float16", "float32"):
            with tempfile.TemporaryDirectory(dir=run.root.parent) as tmp:
                started = time.time()
                name = f"merged {'fp16' if dtype == 'float16' else 'fp32'}"
                try:
                    aside = export_merged(run.root, Path(tmp) / "merged", dtype=dtype)
                except UserError as refused:  # a failed check is a result too: its numbers, and why
                    partial = Path(tmp) / "merged.partial"
                    fidelity = json.loads((partial / "fidelity.json").read_text())
                    row = fidelity_row(name, fidelity, folder_bytes(partial), time.time() - started)
                    rows.append({**row, "refused": str(refused).split(". See ")[0]})
                    continue
                rows.append(fidelity_row(name, aside.fidelity, folder_bytes(aside.out), time.time() - started))
    if has_gguf:
        from qlora_pipe.export.gguf_command import export_gguf

        for gguf_type in [t for t in args.gguf.split(",") if t]:
            result = export_gguf(run, merged.out, gguf_type)
            rows.append(
                llama_cpp_row(f"GGUF {gguf_type} of the merged model (llama.cpp)", result["bytes"], result["llama_cpp"])
            )
    started = time.time()
    unmerged = export_unmerged(run.root, gguf_type="auto" if has_gguf else None)
    base_bytes = folder_bytes(unmerged.out / "base")
    rows.append(
        fidelity_row(
            "unmerged: base + PEFT adapter (transformers; vLLM --enable-lora)",
            unmerged.fidelity,
            base_bytes,
            time.time() - started,
        )
    )
    if has_gguf:
        pair = unmerged.fidelity["gguf"]
        size = pair["base"]["bytes"] + pair["lora"]["bytes"]
        rows.append(
            llama_cpp_row(
                f"unmerged GGUF: base {pair['base']['type']} + LoRA GGUF (llama.cpp --lora)", size, pair["llama_cpp"]
            )
        )
    result = {
        "date": date.today().isoformat(),
        "machine": machine_description(),
        "command": f"python -m benchmarks serving {args.run}",
        "rows": rows,
        "unmerged_gguf": unmerged.fidelity.get("gguf") if has_gguf else None,
    }
    out = REPO / f"benchmarks/results/serving-{run.root.name}-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(rows))
    print(f"written: {out}")
    return 0
