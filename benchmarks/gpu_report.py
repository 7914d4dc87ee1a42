"""The GPU check's results as the tables in docs/performance.md: measured vs planned memory, MFU, the
anchor comparison and the CUDA-only paths. ``python -m benchmarks docs gpu-<date>-<gpu>.json`` writes them
between the gpu markers; a stage that failed or did not run shows its error, never a blank."""

from __future__ import annotations

from typing import Any

GIB = 2**30
START, END = "<!-- gpu-results:start -->\n", "<!-- gpu-results:end -->\n"


def gib(value: int | None) -> str:
    return f"{value / GIB:.2f} GiB" if value else "–"


def pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "–"


def _failed(r: dict[str, Any], stage: str) -> str | None:
    return r.get("errors", {}).get(stage) if stage not in r else None


def length_rows(r: dict[str, Any]) -> list[str]:
    rows = [
        "| sequence | tokens/s | MFU | HFU | peak allocated | planned | planner error | "
        "allocator slack | CUDA context |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r.get("lengths", []):
        planned = (row.get("planned") or {}).get("allocated")
        error = row.get("planner_error_percent")
        rows.append(
            f"| {row['length']:,} | {row['tokens_per_second']:,.0f} | {pct(row.get('mfu'))} | {pct(row.get('hfu'))} "
            f"| {gib(row.get('peak_memory_bytes'))} | {gib(planned)} | {'–' if error is None else f'{error:+.1f}%'} "
            f"| {gib(row.get('allocator_slack_bytes'))} | {gib(row.get('cuda_context_bytes'))} |"
        )
    return rows


def anchor_rows(r: dict[str, Any]) -> list[str]:
    rows = ["| comparison (their settings) | theirs | ours | goal |", "|---|---:|---:|---|"]
    tune = r.get("torchtune_anchor")
    if tune:
        ref = tune["reference"]
        compiled = "" if tune.get("torch_compile") else " (not compiled)"
        rows.append(
            f"| torchtune, {tune['settings']}: peak memory | {ref['peak_memory_gib']} GiB (RTX 4090) "
            f"| {gib(tune.get('peak_memory_bytes'))}{compiled} "
            f"| ≤ 7.4 GiB: {_verdict(tune.get('meets_peak_goal'))} |"
        )
        rows.append(
            f"| torchtune, same settings: MFU | {pct(ref['mfu_implied_on_rtx4090'])} "
            f"({ref['tokens_per_second']:,} tokens/s on a 4090) | {pct(tune.get('mfu'))} "
            f"| ≥ 55%: {_verdict(tune.get('meets_mfu_goal'))} |"
        )
    elif _failed(r, "torchtune_anchor"):
        rows.append(f"| torchtune point | 7.4 GiB, 2,413 tokens/s | failed: {_failed(r, 'torchtune_anchor')} | |")
    sloth = r.get("unsloth_anchor")
    if sloth:
        for name in ("default", "activation_offloading"):
            found = sloth.get(name, {})
            ours = f"{found['longest_fitting_length']:,} tokens" if "longest_fitting_length" in found else "–"
            rows.append(
                f"| unsloth, {sloth['settings']}: longest context under 24 GB, ours {name.replace('_', ' ')} "
                f"| {sloth['reference']['tokens']:,} (HF + FA2: {sloth['reference']['hf_fa2_tokens']:,}) "
                f"| {found.get('skipped', ours)} "
                f"| {'≥ 32k: ' + _verdict(sloth.get('meets_goal')) if name == 'default' else ''} |"
            )
    elif _failed(r, "unsloth_anchor"):
        rows.append(f"| unsloth longest context | 78,475 | failed: {_failed(r, 'unsloth_anchor')} | |")
    return rows


def long_context_rows(r: dict[str, Any]) -> list[str]:
    """The planner's longest sequence per long-context switch, and whether it (and 10% more) fit the GPU."""
    found = r.get("long_context")
    if not found:
        failed = _failed(r, "long_context")
        return [f"Long-context stage: failed: {failed}."] if failed else []
    rows = ["| switches | planned longest | fits at it | fits 10% above |", "|---|---:|---|---|"]
    for name in ("neither", "tiled_mlp", "activation_offloading", "both"):
        row = found.get(name, {})
        if "skipped" in row:
            rows.append(f"| {name.replace('_', ' ')} | – | {row['skipped']} | |")
            continue
        planned = row.get("planned_longest")
        cells = [_verdict(row.get(key)) for key in ("fits_at_planned", "fits_10_percent_above")]
        tried = f" ({row['tokens_at_planned']:,} tried)" if row.get("tokens_at_planned") not in (None, planned) else ""
        rows.append(
            f"| {name.replace('_', ' ')} | {f'{planned:,}' if planned else '–'}{tried} | {cells[0]} | {cells[1]} |"
        )
    return rows


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "not met", None: "–"}[met]  # for fits: met = it fit


def path_rows(r: dict[str, Any]) -> list[str]:
    rows = ["| CUDA-only path | outcome |", "|---|---|"]
    quick, resume = r.get("quickstart_pipeline"), r.get("resume_after_sigterm")
    if quick:
        fid = quick["fidelity"]
        rows.append(
            f"| quickstart on the GPU (paged 8-bit AdamW, bitsandbytes 4-bit kernels): train, export, chat "
            f"| eval loss {quick['eval_loss_before']:.3f} → {quick['final_eval_loss']:.3f}; export verified: "
            f"top-1 agreement {pct(fid['top1_agreement'])}, max logit Δ {fid['max_abs_logit_diff']:.3g}; "
            f"{sum(quick['seconds'].values()):.0f} s |"
        )
    if resume:
        rows.append(
            f"| SIGTERM at step {resume['stopped_at_step']}, then resume | losses of {resume['steps']} steps vs a "
            f"straight run: max relative difference {resume['max_relative_loss_difference']:.2g} "
            f"({'within' if resume['equal_within_bf16'] else 'beyond'} bf16 rounding) |"
        )
    flash = r.get("flash_attention")
    if flash:
        rows.append(f"| flash-attention 2 at {flash['length']:,} | {flash.get('skipped') or _speed(flash)} |")
    for switch in r.get("switches", []):
        rows.append(
            f"| `{switch['switch']}: true` at {switch['length']:,} | {switch.get('skipped') or _speed(switch)} |"
        )
    for stage in ("quickstart_pipeline", "resume_after_sigterm", "flash_attention", "switches"):
        if _failed(r, stage):
            rows.append(f"| {stage.replace('_', ' ')} | failed: {_failed(r, stage)} |")
    return rows


def _speed(row: dict[str, Any]) -> str:
    return f"{row['tokens_per_second']:,.0f} tokens/s, peak {gib(row.get('peak_memory_bytes'))}"


def gpu_section(r: dict[str, Any], rel: str) -> str:
    search = r.get("longest_sequence") or {}
    longest = search.get("longest_fitting_length")
    cap = f"capped to {r['memory_cap_bytes'] / 1e9:.0f} GB" if r.get("memory_cap_bytes") else "a dry run: not a result"
    head = (
        f"Measured {r['date']} on {r['device']} ({cap}) with "
        f"`{r['command']}`; model: Llama-3.1-8B shape, random weights, 4-bit NF4, our default recipe (r=16, "
        "all linear, paged 8-bit AdamW, bf16, gradient checkpointing, batch 1)."
    )
    lines = [head, "", *length_rows(r), ""]
    lines.append(f"Longest sequence under the cap: {f'{longest:,} tokens' if longest else '–'}.")
    lines += ["", *anchor_rows(r), "", *long_context_rows(r), "", *path_rows(r), ""]
    lines.append(f"Raw numbers: `{rel}`. Regenerate with `python -m benchmarks docs {rel}`.")
    return "\n".join(lines) + "\n"


def headline(r: dict[str, Any]) -> str:
    """The one-screen summary's numbers, under the per-stage lines."""
    lines = []
    for row in r.get("lengths", []):
        lines.append(
            f"  {row['length']:>6} tokens: {row['tokens_per_second']:,.0f} tokens/s, MFU {pct(row.get('mfu'))}"
        )
    if r.get("longest_sequence"):
        lines.append(f"  longest under the cap: {r['longest_sequence']['longest_fitting_length']:,} tokens")
    if r.get("torchtune_anchor"):
        tune = r["torchtune_anchor"]
        lines.append(f"  torchtune settings: peak {gib(tune.get('peak_memory_bytes'))}, MFU {pct(tune.get('mfu'))}")
    return "\n".join(lines)
