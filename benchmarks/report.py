"""Turn a benchmarks/cpu.py results file into a markdown table, a PNG chart and docs/performance.md's numbers.

    python -m benchmarks docs benchmarks/results/<date>-<machine>.json

Only measured numbers from the results file are written; nothing here is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "performance.md"
START, END = "<!-- bench:start -->\n", "<!-- bench:end -->\n"
GIB, MIB = 2**30, 2**20


TARGET_SPREAD_PERCENT = 3.0  # what --steps should bring the spread of the repeats under


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of the repeats, and the spread: half their range, in percent of the median."""
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "spread_percent": 100 * (max(values) - min(values)) / 2 / median,
    }


def trainer_noise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Steady-state step time of each side over the repeats, and the throughput ratio ours / plain, per repeat.

    Repeat i of each side ran next to each other (alternating which went first), so the ratio is taken per
    repeat (plain step time / ours); its median is the result and its spread the noise. Where the repeats
    disagree on which side is faster, or the median is within its spread of 1, there is no measurable difference.
    """
    step = {kind: [r["steady_seconds"] / r["steady_steps"] for r in rs] for kind, rs in runs.items()}
    cpu = {kind: [r["steady_cpu_seconds"] / r["steady_steps"] for r in rs] for kind, rs in runs.items()}
    ratio = spread([p / o for o, p in zip(step["ours"], step["plain"], strict=True)])
    # Within the noise: the repeats disagree on which side is faster, or the median is within its spread of 1.
    within = ratio["min"] <= 1 <= ratio["max"] or abs(ratio["median"] - 1) * 100 <= ratio["spread_percent"]
    n = f"±{ratio['spread_percent']:.1f}%"
    return {
        "ours_step_seconds": spread(step["ours"]),
        "plain_step_seconds": spread(step["plain"]),
        "steady_ratio_ours_over_plain": ratio,
        "steady_cpu_ratio_ours_over_plain": spread([p / o for o, p in zip(cpu["ours"], cpu["plain"], strict=True)]),
        "target_spread_percent": TARGET_SPREAD_PERCENT,
        "within_noise": within,
        "verdict": f"no measurable difference at {n}" if within else f"{ratio['median']:.3f} {n}",
    }


def _seconds(s: dict[str, float]) -> str:
    return f"{s['median']:.3f} s ({s['min']:.3f} – {s['max']:.3f})"


def _trainer_rows(r: dict[str, Any]) -> list[str]:
    t = r["trainers"]
    n = trainer_noise(t["runs"])  # from the raw repeats, so an older results file renders the same way
    ratio = n["steady_ratio_ours_over_plain"]
    return [
        f"| training path | step time, steady state: median ({t['repeats']} repeats: min – max) | spread "
        "| supervised tokens/s, whole train() (median) | peak memory |",
        "|---|---|---|---|---|",
        f"| qlora-pipe (`run_training`, PipeTrainer + callbacks) | {_seconds(n['ours_step_seconds'])} "
        f"| ±{n['ours_step_seconds']['spread_percent']:.1f}% | {t['ours_tokens_per_second']:.1f} "
        f"| {t['ours_peak_memory_bytes'] / GIB:.2f} GiB |",
        f"| plain TRL SFTTrainer + PEFT + bitsandbytes script | {_seconds(n['plain_step_seconds'])} "
        f"| ±{n['plain_step_seconds']['spread_percent']:.1f}% | {t['plain_tokens_per_second']:.1f} "
        f"| {t['plain_peak_memory_bytes'] / GIB:.2f} GiB |",
        f"| **throughput ratio ours / plain** (per repeat: plain step time / ours) | **{n['verdict']}** "
        f"(median {ratio['median']:.3f}; {ratio['min']:.3f} – {ratio['max']:.3f}) | ±{ratio['spread_percent']:.1f}% "
        f"| {t['ratio_ours_over_plain']:.3f} | |",
    ]


def _trainer_notes(r: dict[str, Any]) -> str:
    """What the table's noise and identical work rest on; a paragraph after the table, never inside it."""
    t = r["trainers"]
    n = trainer_noise(t["runs"])
    worst = max(n[k]["spread_percent"] for k in ("ours_step_seconds", "plain_step_seconds"))
    worst = max(worst, n["steady_ratio_ours_over_plain"]["spread_percent"])
    target = f"±{TARGET_SPREAD_PERCENT:.0f}%"
    met = (
        f"under the {target} target"
        if worst < TARGET_SPREAD_PERCENT
        else f"above the {target} target: more `--steps` per repeat bring it down"
    )
    text = (
        f"Spread: half the range of the repeats, in percent of their median (largest here ±{worst:.1f}%, {met}). "
        "Where the repeats disagree on which side is faster, or the median ratio is within its spread of 1, "
        "the ratio is stated as no measurable difference at that spread. "
    )
    if "batch_digest" in t:
        text += (
            f"Identical work: the sha256 of input_ids and labels of each of the {t['batches']} batches every run "
            f"trained on, the same list in every repeat of both sides (digest `{t['batch_digest'][:16]}`; "
            "the benchmark fails otherwise)."
        )
    else:
        text += "Identical work: this results file predates per-batch hashes (only token totals were compared)."
    return text + "\n"


def _method_rows(r: dict[str, Any]) -> list[str]:
    names = {
        "qlora_nf4": "QLoRA (4-bit NF4 base + LoRA)",
        "lora_bf16": "LoRA on a bf16 base",
        "full_bf16": "full fine-tuning (bf16)",
    }
    steps = r["methods"]["steps"]
    rows = [
        "| method | model weights in memory | peak memory (process) | trainable parameters | saved per task "
        f"| supervised tokens trained ({steps} steps) |",
        "|---|---|---|---|---|---|",
    ]
    for key, m in r["methods"]["methods"].items():
        weights = f"{m['weights_bytes'] / MIB:.1f} MiB" if m.get("weights_bytes") else "-"
        # Counted in the batches trained on; older results files counted the dataset on one side: not shown.
        tokens = f"{m['supervised_tokens']:,}" if "batches" in m else "-"
        rows.append(
            f"| {names[key]} | {weights} | {m['peak_memory_bytes'] / GIB:.2f} GiB | {m['trainable_params']:,} "
            f"({m['trainable_percent']:.2f}%) | {m['saved_bytes'] / MIB:.1f} MiB | {tokens} |"
        )
    return rows


def _latency_rows(r: dict[str, Any]) -> list[str]:
    lat = r["latency"]
    rows = [
        f"| model ({lat['prompt_tokens']}-token prompt, {lat['new_tokens']} new tokens, greedy) "
        "| ms per token (median) |",
        "|---|---|",
    ]
    labels = {
        "base": "base model",
        "merged": "merged model (qlora-pipe export)",
        "adapter_unmerged": "base + unmerged adapter (PEFT)",
    }
    rows += [f"| {label} | {lat[key]['ms_per_token']:.1f} |" for key, label in labels.items()]
    return rows


def _export_rows(r: dict[str, Any]) -> list[str]:
    e = r["export"]
    return [
        f"| export of a {e['model_bytes_bf16'] / GIB:.2f} GiB (bf16) model | peak RSS | time |",
        "|---|---|---|",
        f"| importing the libraries only | {e['libraries_only_peak_rss_bytes'] / GIB:.2f} GiB | |",
        f"| qlora-pipe export (NF4-faithful, streaming) | {e['ours_peak_rss_bytes'] / GIB:.2f} GiB "
        f"| {e['ours_seconds']:.0f} s |",
        f"| load + PEFT merge_and_unload + save | {e['peft_merge_and_unload_peak_rss_bytes'] / GIB:.2f} GiB "
        f"| {e['peft_seconds']:.0f} s |",
    ]


def markdown_table(r: dict[str, Any]) -> str:
    """All four comparisons as markdown, headed by what was run, where and when."""
    m = r["train_model"]
    head = (
        f"Measured {r['date']} on {r['machine']} with `{r['command']}` ({r['bench_seconds']:.0f} s). "
        f"Training model: random-weight Llama, hidden {m['hidden']}, {m['layers']} layers, "
        f"{m['parameters'] / 1e6:.1f}M parameters, bundled legal-qa rows (max length {m['max_length']}); "
        f"{r['trainers']['repeats']} alternating repeats per side of {r['trainers']['steps']} steps "
        "(medians of the repeats). "
        f"Peak memory is the process's peak RSS on CPU (torch.cuda.max_memory_allocated on a GPU).\n"
    )
    trainers = [*_trainer_rows(r), "", _trainer_notes(r)]
    parts = [head, *trainers, *_method_rows(r), "", *_latency_rows(r), "", *_export_rows(r)]
    return "\n".join(parts) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    """Four small bar charts, one per comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    t, methods, lat, e = r["trainers"], r["methods"]["methods"], r["latency"], r["export"]
    bars = [
        ("supervised tokens/s", ["ours", "plain TRL"], [t["ours_tokens_per_second"], t["plain_tokens_per_second"]]),
        ("peak RSS (GiB)", ["QLoRA", "LoRA bf16", "full"], [m["peak_memory_bytes"] / GIB for m in methods.values()]),
        (
            "ms / generated token",
            ["base", "merged", "unmerged"],
            [lat[k]["ms_per_token"] for k in ("base", "merged", "adapter_unmerged")],
        ),
        (
            "export peak RSS (GiB)",
            ["ours", "merge_and_unload"],
            [e["ours_peak_rss_bytes"] / GIB, e["peft_merge_and_unload_peak_rss_bytes"] / GIB],
        ),
    ]
    for ax, (title, labels, values) in zip(axes, bars, strict=True):
        ax.bar(labels, values, color=["#2a6f97", "#a9a9a9", "#c9a227"][: len(values)])
        ax.set_title(title)
        for i, value in enumerate(values):
            ax.annotate(f"{value:.2f}" if value < 100 else f"{value:.0f}", (i, value), ha="center", va="bottom")
    fig.suptitle(f"qlora-pipe benchmarks, {r['date']}, {r['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def docs_section(r: dict[str, Any], results_file: Path) -> str:
    resolved = Path(results_file).resolve()
    rel = resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else results_file
    link = Path(os.path.relpath(resolved, DOC.parent))  # links resolve from the page, not the repository root
    return (
        f"{markdown_table(r)}\n![benchmark chart]({link.with_suffix('.png').as_posix()})\n\n"
        f"Raw numbers, every repeat and library versions: [`{Path(rel).as_posix()}`]({link.as_posix()}). "
        "Regenerate this section with `python -m benchmarks docs RESULTS.json`.\n"
    )


def replace_between(start: str, end: str, section: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"{DOC.name} has no {start.strip()} ... {end.strip()} markers")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    DOC.write_text(pattern.sub(lambda _: start + section + end, text))


def update_docs(results_file: Path) -> None:
    """Rewrite docs/performance.md between the bench markers (CPU results) or the gpu markers (the GPU
    check's results) only: others edit other sections concurrently."""
    result = json.loads(Path(results_file).read_text())
    if "flops_convention" in result:  # the GPU check's results: their own section
        from benchmarks.gpu_report import END as GPU_END
        from benchmarks.gpu_report import START as GPU_START
        from benchmarks.gpu_report import gpu_section

        resolved = Path(results_file).resolve()
        rel = resolved.relative_to(REPO).as_posix() if resolved.is_relative_to(REPO) else str(results_file)
        replace_between(GPU_START, GPU_END, gpu_section(result, rel))
    else:
        replace_between(START, END, docs_section(result, Path(results_file)))
    print(f"updated {DOC}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks docs", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a benchmarks/results/<date>-<machine>.json file")
    args = parser.parse_args(argv)
    update_docs(args.results)
    return 0
