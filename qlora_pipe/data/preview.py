"""Show examples exactly as training sees them: trained tokens apart from masked ones."""

from __future__ import annotations

from itertools import groupby, pairwise

from qlora_pipe.data.prepared import IGNORE, PreparedData

GREEN, DIM, BOLD, RESET = "\x1b[32m", "\x1b[2m", "\x1b[1m", "\x1b[0m"
OPEN, CLOSE = "[[", "]]"


def render_example(input_ids: list[int], labels: list[int], tokenizer, color: bool, marks: list | None = None) -> str:
    """The decoded example; trained spans in green (terminal) or between [[ and ]] (otherwise). ``marks``
    ((token index, label) pairs) put a tag such as <<tool call, trained>> before the token they name, or
    before the trained span that holds it."""
    tags = {index: label for index, label in marks or []}
    pieces = []
    runs = groupby(enumerate(zip(input_ids, labels, strict=True)), key=lambda item: item[1][1] != IGNORE)
    for trained, run in runs:
        tokens = list(run)
        inside = [i for i, (index, _) in enumerate(tokens) if index in tags]
        cuts = [0] if trained else sorted({0, *inside})
        for begin, end in pairwise([*cuts, len(tokens)]):
            named = inside if trained else [i for i in inside if i == begin]
            for i in named:
                tag = f"<<{tags[tokens[i][0]]}>>"
                pieces.append(f"{BOLD}{tag}{RESET}" if color else tag)
            text = tokenizer.decode([token for _, (token, _) in tokens[begin:end]])
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
    marks = prepared.reports[0].marks
    if any(marks[:shown]):
        legend += "; tool calls, tool results and reasoning tagged <<part, trained or masked>>"
    lines.append(f"\n{shown} training example(s) as the model sees them ({legend}):")
    for index in range(shown):
        row = prepared.train[index]
        lines.append(f"\n--- example {index + 1} ({len(row['input_ids'])} tokens) ---")
        row_marks = marks[index] if index < len(marks) else None
        lines.append(render_example(row["input_ids"], row["labels"], tokenizer, color, row_marks))
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


def image_runs(input_ids: list[int], labels: list[int], image_tokens: set[int]) -> list[tuple[bool, list, list]]:
    """The row cut into (is an image run, ids, labels) pieces."""
    pieces = []
    index = 0
    for is_image, run in groupby(input_ids, key=lambda token: token in image_tokens):
        n = len(list(run))
        pieces.append((is_image, input_ids[index : index + n], labels[index : index + n]))
        index += n
    return pieces


def vision_preview(prepared: PreparedData, processor, count: int, color: bool) -> str:
    from qlora_pipe.vision.encode import image_token_ids

    tokenizer = processor.tokenizer
    image_tokens = image_token_ids(processor)
    legend = "trained tokens in green, masked dimmed" if color else "trained tokens between [[ and ]]"
    lines = ["data report:", *[f"  {report.line()}" for report in prepared.reports]]
    shown = min(count, len(prepared.train))
    lines.append(f"\n{shown} training example(s) as the model sees them ({legend}):")
    for index in range(shown):
        row = prepared.train[index]
        text = []
        for is_image, ids, labels in image_runs(row["input_ids"], row["labels"], image_tokens):
            text.append(f"<image: {len(ids)} tokens>" if is_image else render_example(ids, labels, tokenizer, color))
        lines.append(
            f"\n--- example {index + 1} ({len(row['input_ids'])} tokens, {len(row['image_files'])} images) ---"
        )
        lines.append("".join(text))
    return "\n".join(lines)
