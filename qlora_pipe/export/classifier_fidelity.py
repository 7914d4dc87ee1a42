"""Does the merged classifier reproduce the trained one? Class logits on the run's held-out rows."""

from __future__ import annotations

from typing import Any

import torch

from qlora_pipe.export.verdict import judge


def verify_classifier(recipe, run, merged_dir, dtype: torch.dtype, limit: int = 64) -> dict[str, Any]:
    """A classifier (task: classification): class logits of the trained and the merged classifier on the
    run's held-out rows, the same criteria applied to the cross-entropy over the classes and to the logits;
    prediction agreement is reported."""
    from transformers import AutoModelForSequenceClassification

    from qlora_pipe.data.classification import prepare_classification_data
    from qlora_pipe.machine.hardware import dtype_for_inference
    from qlora_pipe.models.classifier import load_trained_classifier, predict
    from qlora_pipe.models.loading import load_run_tokenizer, training_device

    tokenizer = load_run_tokenizer(run.root)
    data, _ = prepare_classification_data(recipe, tokenizer)
    split, name = (data.eval, "eval") if data.eval is not None else (data.train, "train")
    rows = split.select(range(min(limit, len(split))))
    gold = torch.tensor(rows["labels"])
    trained = load_trained_classifier(recipe, run.root, tokenizer)
    predicted_trained, logits_trained = predict(trained, rows)
    del trained
    served = getattr(torch, dtype_for_inference(str(dtype).removeprefix("torch.")))
    merged = AutoModelForSequenceClassification.from_pretrained(
        merged_dir, dtype=served, device_map={"": training_device()}
    ).eval()
    predicted_merged, logits_merged = predict(merged, rows)
    del merged
    loss_trained = torch.nn.functional.cross_entropy(logits_trained, gold).item()
    loss_merged = torch.nn.functional.cross_entropy(logits_merged, gold).item()
    diff = (logits_trained - logits_merged).abs()
    result = {
        "examples": len(gold),
        "trained_tokens_compared": len(gold),  # one label per row
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
        "mean_abs_logit": logits_trained.abs().mean().item(),
        "top1_agreement": sum(a == b for a, b in zip(predicted_trained, predicted_merged, strict=True)) / len(gold),
        "eval_loss_trained": loss_trained,
        "eval_loss_merged": loss_merged,
        "split": name,
    }
    result["relative_loss_change"] = abs(loss_merged - loss_trained) / max(abs(loss_trained), 1e-9)
    result["relative_logit_diff"] = result["mean_abs_logit_diff"] / max(result["mean_abs_logit"], 1e-9)
    return judge(result, None)
