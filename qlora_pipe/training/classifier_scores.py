"""Held-out accuracy, macro-F1 and confusion matrix of a classifier, before training and after it."""

from __future__ import annotations

CLASSIFIER_EVAL = "classifier_eval.json"


def held_out_classifier_scores(recipe, run, data):
    from qlora_pipe.models.classifier import predict, scores
    from qlora_pipe.training.callbacks import HeldOutBeforeAfter

    path = run.root / CLASSIFIER_EVAL
    gold = list(data.eval["labels"])

    def measure(model) -> dict:
        was_training = model.training
        model.eval()
        try:
            predicted, _ = predict(model, data.eval)
        finally:
            model.train(was_training)
        return scores(predicted, gold, data.classes)

    return HeldOutBeforeAfter(path, measure)
