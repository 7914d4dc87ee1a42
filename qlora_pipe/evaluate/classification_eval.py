"""`qlora-pipe eval` of a classifier (task: classification): accuracy, macro-F1 and the confusion matrix of
the base with its untrained head (the adapter disabled: the head training started from) and of the tuned
classifier, on the run's held-out rows (or --data FILE of text / label rows); with --merged, the exported
model loaded by plain transformers instead of the 4-bit base + adapter."""

from __future__ import annotations

import time
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.runs import RunDir, write_json_atomic


def labelled_rows(recipe, tokenizer, data: str | None, limit: int | None):
    from qlora_pipe.data.classification import prepare_classification_data
    from qlora_pipe.data.report import given_eval_data

    if data is not None:
        only = {"train_path": data, "eval_path": None, "sources": [], "eval_fraction": 0.0, "max_train_samples": None}
        section = recipe.data.model_copy(update=only)
        recipe = recipe.model_copy(update={"data": section})
    prepared, _ = prepare_classification_data(recipe, tokenizer, "train" if data is None else given_eval_data(data))
    split = prepared.eval if prepared.eval is not None and data is None else prepared.train
    rows = split.select(range(len(split) if limit is None else min(limit, len(split))))
    return rows, data or ("held-out rows" if prepared.eval is not None and data is None else "training rows")


def run_classification_eval(run: RunDir, recipe, data: str | None, limit: int | None, merged: bool) -> dict[str, Any]:
    from qlora_pipe.models.classifier import load_trained_classifier, predict, scores
    from qlora_pipe.models.loading import load_run_tokenizer

    started = time.time()
    tokenizer = load_run_tokenizer(run.root)
    rows, source = labelled_rows(recipe, tokenizer, data, limit)
    if not len(rows):
        raise UserError(f"eval {run.root}: no usable labelled rows in {source}")
    gold, classes = list(rows["labels"]), recipe.classification.labels
    model = load_trained_classifier(recipe, run.root, tokenizer)
    with model.disable_adapter():
        columns = {"base": scores(predict(model, rows)[0], gold, classes)}
    if merged:
        from transformers import AutoModelForSequenceClassification

        del model
        model = AutoModelForSequenceClassification.from_pretrained(run.root / "merged").eval()
    columns["tuned"] = scores(predict(model, rows)[0], gold, classes)
    result = {"run": str(run.root), "task": "classification", "data": source, "labels": classes, "columns": columns}
    result["tuned_model"] = "merged model" if merged else "4-bit base + adapter"
    out = (run.root / "merged" / run.eval_report.name) if merged else run.eval_report
    write_json_atomic(out, result)
    return {**result, "path": str(out), "seconds": time.time() - started}


def classification_table(result: dict[str, Any]) -> str:
    base, tuned = result["columns"]["base"], result["columns"]["tuned"]
    lines = [
        f"{tuned['rows']} {result['data']}, {len(result['labels'])} classes; tuned: {result['tuned_model']}",
        f"{'':28}{'base (untrained head)':>24}{'tuned':>10}",
        f"{'accuracy':28}{100 * base['accuracy']:>23.1f}%{100 * tuned['accuracy']:>9.1f}%",
        f"{'macro-F1':28}{base['macro_f1']:>24.3f}{tuned['macro_f1']:>10.3f}",
        f"{'majority class (accuracy)':28}{100 * tuned['majority_class_accuracy']:>23.1f}%",
        "confusion matrix of the tuned classifier (rows: true class, columns: predicted):",
    ]
    width = max(map(len, result["labels"]))
    for name, row in zip(result["labels"], tuned["confusion"], strict=True):
        lines.append(f"  {name:>{width}} " + " ".join(f"{n:>3}" for n in row))
    return "\n".join(lines)
