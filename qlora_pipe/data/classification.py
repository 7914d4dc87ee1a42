"""The data stage for text classification (task: classification): text / label rows, checked and reported.

Rows come from the same sources as every task (local files, Hub data sets, mixing, eval splits, dedupe);
``classification.text_field`` and ``classification.label_field`` name the columns. The classes are
``classification.labels`` in that order, or the training data's labels sorted. Rows are dropped, and
counted by reason, when the text is missing or empty, the label is missing, or the label is not one of
the classes (an eval row with a class the training data never had, say); rows longer than
data.max_length follow data.overlength (drop, truncate, or error). The label is the training target:
a row counts one supervised label, not tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from typing import Any

from qlora_pipe.data.prepare import collect, hold_out
from qlora_pipe.data.prepared import PreparedData
from qlora_pipe.data.report import SplitReport, require_eval_rows
from qlora_pipe.errors import UserError
from qlora_pipe.machine.dist import is_main_process

log = logging.getLogger(__name__)


def label_name(label: Any) -> str | None:
    """The class a label names, or None when it names none. A whole-number float is its integer: a column
    of integers with a gap comes back from pandas, CSV and parquet as floats (3 -> 3.0)."""
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, str) and label.strip():
        return label
    return str(label) if isinstance(label, int) and not isinstance(label, bool) else None


def labelled_row(text_field: str, label_field: str):
    def convert(row: dict[str, Any]) -> dict[str, str] | str:
        text, label = row.get(text_field), row.get(label_field)
        if not isinstance(text, str) or not text.strip():
            return f"missing or empty {text_field}"
        if label is None or label == "" or (isinstance(label, float) and math.isnan(label)):  # NaN: pandas' gap
            return f"missing {label_field} (a string or an integer)"
        name = label_name(label)
        if name is None:  # said by type: a boolean, a fraction or a list is there, just not a usable class
            kind = {bool: "true/false", float: "not a whole number", str: "blank"}.get(type(label))
            return f"{label_field} is {kind or 'a ' + type(label).__name__}; a class is a string or an integer"
        return {"text": text, "label": name}

    return convert


def class_names(recipe, train: list[dict[str, str]], what: str = "training data") -> list[str]:
    labels = recipe.classification.labels
    if labels is not None:
        if len(set(labels)) != len(labels):
            raise UserError("classification.labels: a label is listed twice")
        return list(labels)
    found = sorted({row["label"] for row in train})
    if len(found) < 2:
        raise UserError(f"{what}: classification needs at least two labels among its usable rows, found {found}")
    return found


def warn_unknown_classes(rows: list[dict[str, str]], names: list[str], report: SplitReport, listed: bool) -> None:
    """Rows of a class the run does not train are dropped; say which classes and how many rows, since a
    report line alone is easy to miss when a class was left out of classification.labels by mistake."""
    unknown = Counter(row["label"] for row in rows if row["label"] not in names)
    if unknown and is_main_process():
        where = "classification.labels" if listed else "the training data's labels"
        counts = ", ".join(f"{name!r} ({count})" for name, count in unknown.most_common())
        log.warning("%s: %d row(s) dropped, their class is not in %s: %s", report.name, unknown.total(), where, counts)


def encode(rows: list[dict[str, str]], tokenizer, names: list[str], data, report: SplitReport):
    """Token ids and the class index of each row; unknown classes and over-long rows handled and counted."""
    from datasets import Dataset

    index = {name: i for i, name in enumerate(names)}
    kept, lengths = [], []
    for number, row in enumerate(rows, start=1):
        if row["label"] not in index:
            report.dropped["label not in classification.labels"] += 1
            continue
        ids = tokenizer(row["text"])["input_ids"]
        if len(ids) > data.max_length:
            if data.overlength == "error":
                raise UserError(f"{report.name}: row {number} is longer than data.max_length {data.max_length}")
            if data.overlength == "drop":
                report.dropped[f"longer than max_length {data.max_length}"] += 1
                continue
            ids, report.truncated = ids[: data.max_length], report.truncated + 1
        kept.append({"input_ids": ids, "labels": index[row["label"]]})
        lengths.append(len(ids))
    report.add_lengths(lengths, [1] * len(lengths))
    return Dataset.from_list(kept) if kept else None


def prepare_classification_data(recipe, tokenizer, train_name: str = "train") -> tuple[PreparedData, list[str]]:
    """Read, check, split, tokenize and report labelled rows; returns the data and the class names.
    ``train_name``: what the first split is called (eval --data reads its file as that split)."""
    data, spec = recipe.data, recipe.classification
    rng = random.Random(recipe.seed)
    train_report, eval_report = SplitReport(train_name), SplitReport("eval")
    convert = labelled_row(spec.text_field, spec.label_field)
    train = collect(data.train_sources(), data, rng, train_report, convert)[: data.max_train_samples]
    held_out = collect(data.held_out_sources(), data, rng, eval_report, convert) if data.held_out_sources() else []
    train, held_out = hold_out(train, held_out, data, rng, eval_report)
    if not train:  # every row dropped: say why, not "no labels"
        raise UserError(f"{train_report.what()}: no usable labelled rows ({train_report.line()})")
    names = class_names(recipe, train, train_report.what())
    for rows, report in ((train, train_report), (held_out, eval_report)):
        warn_unknown_classes(rows, names, report, spec.labels is not None)
    train_ds = encode(train, tokenizer, names, data, train_report)
    if train_ds is None:
        raise UserError(f"{train_report.what()}: no usable labelled rows ({train_report.line()})")
    eval_ds = encode(held_out, tokenizer, names, data, eval_report) if held_out else None
    require_eval_rows(data, len(eval_ds or ()), eval_report)
    reports = [train_report] + ([eval_report] if eval_ds is not None else [])
    for report in reports:
        if is_main_process():
            log.info("data: %s", report.line())
    parts = [data.model_dump_json(), spec.model_dump_json(), getattr(tokenizer, "name_or_path", ""), recipe.seed]
    fingerprint = hashlib.sha256(json.dumps([parts, names, train, held_out]).encode()).hexdigest()[:24]
    return PreparedData(train_ds, eval_ds, reports, None, fingerprint), names


def classification_preview(recipe, tokenizer, count: int) -> str:
    """`qlora-pipe data --preview N` of a classifier: the report, the classes, and N rows as the model sees
    them (the text's tokens, then the class it is trained to give)."""
    data, names = prepare_classification_data(recipe, tokenizer)
    lines = ["data report:", *(f"  {report.line()}" for report in data.reports)]
    lines += [f"\n{len(names)} classes: {', '.join(names)}"]
    lines += [f"\n{min(count, len(data.train))} training row(s) as the model sees them:"]
    for i in range(min(count, len(data.train))):
        row = data.train[i]
        text = tokenizer.decode(row["input_ids"])
        lines.append(f"\n--- row {i + 1} ({len(row['input_ids'])} tokens) -> {names[row['labels']]} ---\n{text}")
    return "\n".join(lines)
