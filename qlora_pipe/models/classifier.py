"""task: classification: a sequence classifier on the same 4-bit base, LoRA on its layers and a trained head.

transformers' AutoModelForSequenceClassification puts a new linear head (``score`` for Llama-style
decoders, ``classifier`` for encoders) on the base's layers and classifies from the last non-pad token
(decoders) or the first token (encoders). The head is created at load (seeded by the recipe) and kept
out of 4-bit; PEFT's SEQ_CLS task trains a copy of it in full (modules_to_save) beside the LoRA
adapter and saves both. The export writes the base's layers merged with the adapter, the trained
head, and a config naming the classifier and its labels; the causal LM head is left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import Recipe

HEADS = ("score", "classifier")  # the classification heads of transformers' decoder and encoder classes


def label_maps(classes: list[str]) -> dict[str, Any]:
    return {
        "num_labels": len(classes),
        "id2label": dict(enumerate(classes)),
        "label2id": {name: i for i, name in enumerate(classes)},
    }


def load_classifier_base(recipe: Recipe, tokenizer, classes: list[str]):
    """The base as a sequence classifier: 4-bit per the recipe, a fresh head for the classes."""
    from transformers import AutoModelForSequenceClassification

    from qlora_pipe.compat.bitsandbytes import keep_plain_nf4_on_cpu
    from qlora_pipe.machine.hardware import with_resolved_precision
    from qlora_pipe.models.loading import (
        DTYPES,
        check_model_source,
        model_location,
        quantization_config,
        training_device,
    )

    check_model_source(recipe)
    name = recipe.model.name_or_path
    quantized = quantization_config(recipe)
    if quantized is not None:  # the new head is created at load: it stays out of 4-bit (all of it, for encoders)
        quantized.llm_int8_skip_modules = list(HEADS)
    from qlora_pipe.compat.trl import sequence_classifier_load

    try:
        with sequence_classifier_load():  # no report of the LM head left out and the new head: both expected
            model = AutoModelForSequenceClassification.from_pretrained(
                model_location(name),
                revision=recipe.model.revision,
                trust_remote_code=recipe.model.trust_remote_code,
                quantization_config=quantized,
                dtype=DTYPES[with_resolved_precision(recipe).quantization.compute_dtype],
                device_map={"": training_device()},
                pad_token_id=tokenizer.pad_token_id,
                use_safetensors=True,
                **label_maps(classes),
            )
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: cannot load {name!r} as a sequence classifier: {exc}") from exc
    keep_plain_nf4_on_cpu(model)
    return model


def load_classifier(recipe: Recipe, tokenizer, classes: list[str]):
    """The classifier to train: the 4-bit base, a LoRA adapter and the trainable head."""
    from qlora_pipe.models.loading import add_lora

    return add_lora(load_classifier_base(recipe, tokenizer, classes), recipe, task_type="SEQ_CLS")


def load_trained_classifier(recipe: Recipe, run_root: Path, tokenizer, classes: list[str] | None = None):
    """A finished run's classifier as trained: base, adapter and trained head (eval mode). ``classes``: the
    head's outputs (None: classification.labels)."""
    from peft import PeftModel

    from qlora_pipe.models.loading import prepare_frozen_base

    torch.manual_seed(recipe.seed)  # the untrained head (adapter disabled) is the one training started from
    classes = classes if classes is not None else recipe.classification.labels
    base = prepare_frozen_base(load_classifier_base(recipe, tokenizer, classes), False)
    return PeftModel.from_pretrained(base, str(run_root), autocast_adapter_dtype=False).eval()


@torch.no_grad()
def predict(model, rows, batch_size: int = 16) -> tuple[list[int], torch.Tensor]:
    """Predicted class and logits of each row (input_ids), batched with right padding."""
    pad = model.config.pad_token_id or 0
    device = next(model.parameters()).device
    preds, logits = [], []
    for start in range(0, len(rows), batch_size):
        group = [rows[i]["input_ids"] for i in range(start, min(start + batch_size, len(rows)))]
        width = max(map(len, group))
        ids = torch.tensor([g + [pad] * (width - len(g)) for g in group], device=device)
        mask = torch.tensor([[1] * len(g) + [0] * (width - len(g)) for g in group], device=device)
        out = model(input_ids=ids, attention_mask=mask).logits.float().cpu()
        logits.append(out)
        preds += out.argmax(-1).tolist()
    return preds, torch.cat(logits) if logits else torch.empty(0)


def scores(predicted: list[int], gold: list[int], classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over the classes present in gold or predicted, and the confusion matrix."""
    n = len(classes)
    confusion = [[0] * n for _ in range(n)]
    for p, g in zip(predicted, gold, strict=True):
        confusion[g][p] += 1
    f1s = []
    for c in range(n):
        tp = confusion[c][c]
        fp = sum(confusion[g][c] for g in range(n)) - tp
        fn = sum(confusion[c]) - tp
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    majority = max((sum(row) for row in confusion), default=0)
    return {
        "rows": len(gold),
        "accuracy": sum(p == g for p, g in zip(predicted, gold, strict=True)) / max(len(gold), 1),
        "macro_f1": sum(f1s) / max(len(f1s), 1),
        "majority_class_accuracy": majority / max(len(gold), 1),
        "confusion": confusion,
    }
