"""Batches of vision rows: ids and labels padded on the right, the images run through the processor's image
processor (the same settings that counted their tokens at the data stage), as the model's forward takes them."""

from __future__ import annotations

from typing import Any

import torch

from qlora_pipe.data.prepared import IGNORE
from qlora_pipe.vision.images import open_rgb

IMAGE_COLUMN = "image_files"  # not "images": TRL would take the rows for raw ones and prepare them itself


def pixel_inputs(processor, images: list[list[bytes]]) -> dict[str, torch.Tensor]:
    """The image processor's tensors for the rows' images (nothing for a batch without images)."""
    if not any(images):
        return {}
    opened = [[open_rgb(data) for data in row] for row in images]
    out = processor.image_processor(images=opened, return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and k not in ("rows", "cols")}


def token_type_inputs(processor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Which tokens are image tokens, where the model takes that as an input: Gemma 3's ``token_type_ids``
    (image tokens attend to each other), Qwen2-VL's ``mm_token_type_ids`` (its 3-D positions). The processor
    returns them itself; a batch built from stored ids must add them, or the model silently runs without."""
    if not getattr(processor, "return_mm_token_type_ids", False):
        return {}
    types = torch.tensor(processor.create_mm_token_type_ids(ids.tolist()), dtype=torch.long)
    name = "token_type_ids" if "token_type_ids" in getattr(processor, "model_input_names", ()) else "mm_token_type_ids"
    return {name: types}


class VisionCollator:
    """The trainer's data collator for task: vision."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.pad_id = processor.tokenizer.pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention[i, :n] = 1
        batch = {
            "input_ids": ids,
            "attention_mask": attention,
            "labels": labels,
            **token_type_inputs(self.processor, ids),
        }
        return {**batch, **pixel_inputs(self.processor, [r[IMAGE_COLUMN] for r in rows])}
