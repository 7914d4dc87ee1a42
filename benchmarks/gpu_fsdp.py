"""The GPU check's multi-GPU stage, the Python half (scripts/gpu_check.sh's fsdp_stage runs the launches):

    python -m benchmarks.gpu_fsdp base              models/fsdp-base: a 1.3B Llama-shaped model with random
                                                    weights and the quickstart's tokenizer, built on the GPU
    python -m benchmarks.gpu_fsdp report GPUS ONE_RC FSDP_RC OUT
                                                    the one-GPU and the FSDP run side by side against their plans

Both run in the stage's work folder (the runs, plans and logs are there).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

# 1.3B parameters: big enough that the shards, not the CUDA context, show.
WIDER = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=20,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def write_base(
    quickstart: Path = Path("models/quickstart-base"), out: Path = Path("models/fsdp-base"), dims: dict | None = None
) -> None:
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(quickstart)
    config.update(dims or WIDER)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for path in quickstart.iterdir():
        if "token" in path.name or path.name.endswith(".jinja"):
            shutil.copy(path, out / path.name)


def run_row(name: str, rc: int, plan_file: Path, root: Path = Path(".")) -> dict[str, Any]:
    """One run's exit code, its plan, and what its summary.json measured (else the end of its log)."""
    plan = json.loads((root / plan_file).read_text())
    row: dict[str, Any] = {"exit": rc, "planned_allocated_bytes": plan["allocated"]}
    row["planned_total_bytes"] = plan["total"]
    summary = root / "runs" / name / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        keys = ("peak_memory_bytes", "peak_memory_kind", "supervised_tokens_per_second", "device")
        row.update({key: data.get(key) for key in keys})
        if row.get("peak_memory_bytes"):
            row["measured_over_planned"] = round(row["peak_memory_bytes"] / plan["allocated"], 3)
    else:
        log = root / f"{name}.log"
        row["log_tail"] = " ".join(log.read_text(errors="replace")[-600:].split()) if log.is_file() else "no log"
    return row


def report(gpus: int, one_rc: int, many_rc: int, root: Path = Path(".")) -> dict[str, Any]:
    result = {
        "gpus": gpus,
        "one_gpu": run_row("one-gpu", one_rc, Path("plan-1.json"), root),
        "fsdp": run_row("fsdp", many_rc, Path("plan-n.json"), root),
    }
    speeds = [result[k].get("supervised_tokens_per_second") for k in ("one_gpu", "fsdp")]
    if all(speeds):
        result["fsdp_speedup_over_one_gpu"] = round(speeds[1] / speeds[0], 2)  # summary.json counts every rank
    return result


def main(argv: list[str]) -> int:
    if argv[:1] == ["base"]:
        write_base()
        return 0
    if argv[:1] == ["report"] and len(argv) == 5:
        result = report(int(argv[1]), int(argv[2]), int(argv[3]))
        out = Path(argv[4])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"written: {out}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
