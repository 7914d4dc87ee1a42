"""The trained model's logits on the verification rows, kept on disk so that the merged model is loaded only
after the trained one is gone: verification then needs the larger of the two models, not their sum.

At 7B the trained model (4-bit base plus adapter) takes about 5 GiB and the merged bf16 model 14 GiB; a
24 GB host cannot hold both with the libraries. Each row's fp32 logits (rows x tokens x vocabulary x 4
bytes: 16 rows of 256 tokens of a 152k vocabulary are 2.5 GB) are written to a folder beside the run, on
the disk the merged model goes to (a RAM-backed /tmp would defeat the purpose), and removed afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch


def row_logits(model, row: dict) -> torch.Tensor:
    """fp32 logits of one row: its input ids, plus the extra model inputs a method's check rows carry (the pixel
    values of a vision row, under "model_inputs")."""
    device = next(model.parameters()).device
    extra = {k: v.to(device) for k, v in row.get("model_inputs", {}).items()}
    return model(input_ids=torch.tensor([row["input_ids"]], device=device), **extra).logits.float()[0]


class StoredLogits:
    """``with StoredLogits(model, rows, near=RUN) as stored:`` then ``stored.row(i)``: row i's fp32 logits."""

    def __init__(self, model, rows: list[dict[str, list[int]]], near: Path) -> None:
        self.model, self.rows, self.near = model, rows, near
        self.folder: Path | None = None

    def __enter__(self) -> StoredLogits:
        self.folder = Path(tempfile.mkdtemp(prefix=".verify-logits-", dir=self.near))
        with torch.no_grad():
            for index, row in enumerate(self.rows):
                logits = row_logits(self.model, row)
                torch.save(logits.cpu(), self.folder / f"{index}.pt")
                del logits
        self.model = None  # the caller drops its own reference; this one must not keep the model alive
        return self

    def __exit__(self, *exc: object) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)  # ours: made by mkdtemp above

    def row(self, index: int) -> torch.Tensor:
        assert self.folder is not None
        return torch.load(self.folder / f"{index}.pt", weights_only=True)
