"""Data-stage speed: our preparation of N chat rows vs a bare datasets.map, first run and cached.

    python -m benchmarks data [--rows 100000] [--num-proc 1]

Both sides start from the same JSONL file and tokenizer (the quickstart tokenizer, trained here
on the bundled corpus). The bare side applies the chat template and tokenizes with
``datasets.map``; ours reads, checks, renders, tokenizes, masks, reports and caches. Writes
``benchmarks/results/data-prep-<date>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

from qlora_pipe.data.prepare import prepare_data
from qlora_pipe.machine.hardware import machine_description
from qlora_pipe.quickstart.builder import build_tokenizer
from qlora_pipe.recipe import DataSection

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python -m benchmarks data"


def make_rows(count: int) -> list[str]:
    base = [json.loads(line) for line in (REPO / "data/legal-qa/train.jsonl").read_text().splitlines()]
    lines = []
    for i in range(count):
        row = base[i % len(base)]
        messages = [dict(m) for m in row["messages"]]
        messages[1]["content"] += f" (variant {i})"  # distinct rows, realistic lengths
        lines.append(json.dumps({"messages": messages}))
    return lines


def bare_map(path: Path, tokenizer, num_proc: int | None) -> float:
    from datasets import load_dataset

    started = time.perf_counter()
    dataset = load_dataset("json", data_files=str(path), split="train", cache_dir=str(path.parent / "hf"))
    dataset.map(
        lambda ex: tokenizer.apply_chat_template(ex["messages"], tokenize=True, return_dict=True),
        num_proc=num_proc,
    )
    return time.perf_counter() - started


def ours(path: Path, tokenizer, num_proc: int | None, cache: Path) -> tuple[float, bool]:
    started = time.perf_counter()
    prepared = prepare_data(DataSection(train_path=str(path), cache_dir=str(cache), num_proc=num_proc), tokenizer)
    return time.perf_counter() - started, prepared.cache_hit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=None)
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer((REPO / "data/legal-qa/corpus.txt").read_text(), 2048)
    import trl.chat_template_utils  # noqa: F401  (import time is not preprocessing time: load it before timing)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("\n".join(make_rows(args.rows)) + "\n")
        bare = bare_map(path, tokenizer, args.num_proc)
        first, hit1 = ours(path, tokenizer, args.num_proc, Path(tmp) / "cache")
        second, hit2 = ours(path, tokenizer, args.num_proc, Path(tmp) / "cache")
    assert not hit1 and hit2
    result = {
        "date": date.today().isoformat(),
        "machine": machine_description(),
        "command": f"{COMMAND} --rows {args.rows}" + (f" --num-proc {args.num_proc}" if args.num_proc else ""),
        "rows": args.rows,
        "bare_datasets_map_s": round(bare, 2),
        "ours_first_run_s": round(first, 2),
        "ours_cached_s": round(second, 2),
        "ratio_first_vs_bare": round(first / bare, 3),
    }
    out = REPO / "benchmarks/results" / f"data-prep-{result['date']}-procs{args.num_proc or 1}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| rows | bare datasets.map | ours, first run | ours, cached | ratio |\n|---|---|---|---|---|")
    print(f"| {args.rows:,} | {bare:.1f} s | {first:.1f} s | {second:.1f} s | {first / bare:.2f}x |")
    print(f"written: {out}")
    return 0
