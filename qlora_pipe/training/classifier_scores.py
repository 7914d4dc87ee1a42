"""Held-out accuracy, macro-F1 and confusion matrix of a classifier, before training and after it."""

from __future__ import annotations

import json

CLASSIFIER_EVAL = "classifier_eval.json"


def held_out_classifier_scores(recipe, run, data):
    from transformers import TrainerCallback

    from qlora_pipe.classifier import predict, scores
    from qlora_pipe.dist import is_main_process
    from qlora_pipe.runs import write_json_atomic
    from qlora_pipe.training.sharded import is_sharded, runs_model_passes

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
            if state.global_step == 0 and runs_model_passes(model):  # a resumed run keeps its "before"
                before = measure(model)
                if is_main_process():
                    write_json_atomic(path, {"before": before})

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if is_sharded(model) or (is_main_process() and path.is_file()):
                after = measure(model)
                if is_main_process() and path.is_file():
                    write_json_atomic(path, {**json.loads(path.read_text()), "after": after})

    return HeldOutClassifierScores()
