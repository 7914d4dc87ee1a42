"""Held-out accuracy, macro-F1 and confusion matrix of a classifier, before training and after it."""

from __future__ import annotations

import json

CLASSIFIER_EVAL = "classifier_eval.json"


def held_out_classifier_scores(recipe, run, data):
    from transformers import TrainerCallback

    from qlora_pipe.classifier import predict, scores
    from qlora_pipe.dist import is_main_process
    from qlora_pipe.runs import write_json_atomic

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

    class HeldOutClassifierScores(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0 and is_main_process():  # a resumed run keeps its "before"
                write_json_atomic(path, {"before": measure(model)})

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if is_main_process() and path.is_file():
                write_json_atomic(path, {**json.loads(path.read_text()), "after": measure(model)})

    return HeldOutClassifierScores()
