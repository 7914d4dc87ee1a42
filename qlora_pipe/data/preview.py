"""Show examples exactly as training sees them: trained tokens apart from masked ones."""

from __future__ import annotations

from itertools import groupby

from qlora_pipe.data.prepared import IGNORE, PreparedData

GREEN, DIM, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"
OPEN, CLOSE = "[[", "]]"


def render_example(input_ids: list[int], labels: list[int], tokenizer, color: bool) -> str:
    """The decoded example; trained spans in green (terminal) or between [[ and ]] (otherwise)."""
    pieces = []
    for trained, run in groupby(zip(input_ids, labels, strict=True), key=lambda pair: pair[1] != IGNORE):
        text = tokenizer.decode([token for token, _ in run])
        if color:
            pieces.append(f"{GREEN}{text}{RESET}" if trained else f"{DIM}{text}{RESET}")
        else:
            pieces.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(pieces)


def preview_text(prepared: PreparedData, tokenizer, count: int, color: bool) -> str:
    legend = "trained tokens in green, masked dimmed" if color else f"trained tokens between {OPEN} and {CLOSE}"
    lines = [f"data report{' (from cache)' if prepared.cache_hit else ''}:"]
    lines += [f"  {report.line()}" for report in prepared.reports]
    shown = min(count, len(prepared.train))
    lines.append(f"\n{shown} training example(s) as the model sees them ({legend}):")
    for index in range(shown):
        row = prepared.train[index]
        lines.append(f"\n--- example {index + 1} ({len(row['input_ids'])} tokens) ---")
        lines.append(render_example(row["input_ids"], row["labels"], tokenizer, color))
    return "\n".join(lines)


def preference_preview_text(prepared: PreparedData, tokenizer, count: int) -> str:
    """Preference pairs side by side: the prompt as rendered, then the chosen and the rejected answer
    (both trained on, end of turn included: DPO raises one against the other)."""
    lines = ["data report:", *[f"  {report.line()}" for report in prepared.reports]]
    shown = min(count, len(prepared.train))
    lines.append(f"\n{shown} preference pair(s); the answers between {OPEN} and {CLOSE} are what DPO compares:")
    for index in range(shown):
        pair = prepared.train[index]
        prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=False)
        lines.append(f"\n--- pair {index + 1} ---\n{prompt}")
        for name in ("chosen", "rejected") if "chosen" in pair else ("completion",):
            full = tokenizer.apply_chat_template(pair["prompt"] + pair[name], tokenize=False)
            label = "" if name != "completion" else (" (desirable)" if pair["label"] else " (undesirable)")
            answer = full[len(prompt) :] if full.startswith(prompt) else full
            lines.append(f"  {name:>8}{label}: {OPEN}{answer}{CLOSE}")
    return "\n".join(lines)
