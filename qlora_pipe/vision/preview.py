"""`qlora-pipe data --preview N` for vision rows: the report, then each row as training sees it, every run of
image tokens shown as ``<image: N tokens>`` (never trained) and the trained tokens marked as for text rows."""

from __future__ import annotations

from itertools import groupby

from qlora_pipe.data.prepared import PreparedData
from qlora_pipe.data.preview import render_example


def image_runs(input_ids: list[int], labels: list[int], image_token: int | None) -> list[tuple[bool, list, list]]:
    """The row cut into (is an image run, ids, labels) pieces."""
    pieces = []
    index = 0
    for is_image, run in groupby(input_ids, key=lambda token: token == image_token):
        n = len(list(run))
        pieces.append((is_image, input_ids[index : index + n], labels[index : index + n]))
        index += n
    return pieces


def vision_preview(prepared: PreparedData, processor, count: int, color: bool) -> str:
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token_id", None)
    legend = "trained tokens in green, masked dimmed" if color else "trained tokens between [[ and ]]"
    lines = ["data report:", *[f"  {report.line()}" for report in prepared.reports]]
    shown = min(count, len(prepared.train))
    lines.append(f"\n{shown} training example(s) as the model sees them ({legend}):")
    for index in range(shown):
        row = prepared.train[index]
        text = []
        for is_image, ids, labels in image_runs(row["input_ids"], row["labels"], image_token):
            text.append(f"<image: {len(ids)} tokens>" if is_image else render_example(ids, labels, tokenizer, color))
        lines.append(
            f"\n--- example {index + 1} ({len(row['input_ids'])} tokens, {len(row['image_files'])} images) ---"
        )
        lines.append("".join(text))
    return "\n".join(lines)
