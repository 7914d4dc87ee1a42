"""The data stage of a vision run (task: vision): rows with images read, checked, split, encoded and reported.

Rows and images are checked as text rows are (data/prepare.py's collect and hold_out): an unreadable image, a
placeholder count that does not match the images, a row that would be cut inside an image are each dropped
and counted under their reason (data.on_bad_row: error makes the first one a one-line error). The kept rows
carry ``input_ids``, ``labels`` and the image files' own bytes (``images``): the collator (vision/collate.py)
turns those into the processor's pixel values for each batch. The fingerprint covers what training receives
(ids, labels and image bytes), so a resumed run can prove it has the same data.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any

from qlora_pipe.data.prepare import collected_splits, masking_method, masking_plan
from qlora_pipe.data.prepared import PreparedData
from qlora_pipe.data.report import SplitReport, require_eval_rows
from qlora_pipe.errors import UserError
from qlora_pipe.recipe import DataSection, SourceSection
from qlora_pipe.vision.collate import IMAGE_COLUMN
from qlora_pipe.vision.encode import BadVisionRow, encode_vision
from qlora_pipe.vision.rows import vision_example

log = logging.getLogger(__name__)


def source_folder(source: SourceSection) -> Path | None:
    """Where a source's relative image paths are found: beside its data file (None for Hub datasets: the
    working directory)."""
    if source.path is None:
        return None
    path = Path(source.path).expanduser()
    return path if path.is_dir() else path.parent


def read_row(row: dict[str, Any], source: SourceSection) -> dict[str, Any] | str:
    return vision_example(row, source_folder(source))


def encode_split(examples: list[dict], processor, template, data: DataSection, report: SplitReport, turns):
    from datasets import Dataset

    rows, image_tokens, images = [], 0, 0
    for index, example in enumerate(examples):
        try:
            row = encode_vision(example, processor, template, data, turns)
        except BadVisionRow as exc:
            if data.on_bad_row == "error":
                raise UserError(f"{report.what()}: row {index + 1}: {exc}") from exc
            report.dropped[str(exc)] += 1
            continue
        image_tokens += row.pop("image_tokens")
        images += len(row[IMAGE_COLUMN])
        report.truncated += row.pop("truncated")
        rows.append(row)
    report.add_lengths([r.pop("n_tokens") for r in rows], [r.pop("n_trained") for r in rows])
    report.conversation_parts.update({"images": images, "image_tokens": image_tokens})
    return Dataset.from_list(rows) if rows else None


def fingerprint(*splits) -> str:
    digest = hashlib.sha256()
    for split in splits:
        for row in split or ():
            digest.update(repr((row["input_ids"], row["labels"])).encode())
            for image in row[IMAGE_COLUMN]:
                digest.update(hashlib.sha256(image).digest())
    return digest.hexdigest()[:24]


def prepare_vision_data(data: DataSection, processor, seed: int = 42) -> PreparedData:
    """The data stage of a vision run (see the module's docstring)."""
    rng = random.Random(seed)
    train_report, eval_report = SplitReport("train"), SplitReport("eval")
    train, held_out = collected_splits(data, rng, train_report, eval_report, source_convert=read_row)
    if not train:
        raise UserError(f"training data: no usable rows after checks ({train_report.line()})")
    template, turns = None, None
    if data.loss_on != "all":
        template, turns = masking_plan(processor.tokenizer)
        train_report.masking = eval_report.masking = masking_method(turns)
    train_ds = encode_split(train, processor, template, data, train_report, turns)
    if train_ds is None:
        raise UserError(f"training data: no usable rows after encoding ({train_report.line()})")
    eval_ds = encode_split(held_out, processor, template, data, eval_report, turns) if held_out else None
    require_eval_rows(data, len(eval_ds or ()), eval_report)
    reports = [train_report] + ([eval_report] if eval_ds is not None else [])
    for report in reports:
        log.info("data: %s", report.line())
    return PreparedData(train_ds, eval_ds, reports, None, fingerprint(train_ds, eval_ds))
