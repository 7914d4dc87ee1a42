"""A sequence classifier (``task: classification``): labelled rows, a 4-bit base with a trained head, held-out
accuracy before and after."""

from __future__ import annotations

import json

from qlora_pipe.methods.base import Method


class Classification(Method):
    auto_class = "AutoModelForSequenceClassification"
    kept_unquantized = ("score", "classifier")  # the head trains in 16-bit
    serves_chat = False
    reads_own_check_rows = True
    verified_block_by_block = False  # loaded whole, with its head

    def refusal(self, what: str, run) -> str | None:
        return {
            "chat": f"chat: {run.root} is a classifier (task: classification); score it with qlora-pipe eval",
            "export --unmerged": "export --unmerged: a classifier is exported merged (its head is trained whole); "
            "leave it out",
            "export --format gguf": "export --format gguf: llama.cpp serves language models, not a classifier's "
            "head; the merged transformers folder is the export (leave out --format)",
        }.get(what)

    def plan_note(self) -> str | None:
        return (
            "task classification: planned as a causal LM of the same base; a classifier's head and loss\n"
            "are smaller than the LM head's chunked loss, so its peak is at or below this plan."
        )

    def unused_base_tensors(self, base, shards, recipe) -> set[str]:
        from qlora_pipe.export.classifier_export import unused_base_tensors

        return unused_base_tensors(base, shards, recipe, recipe.classification.labels)

    def write_export_config(self, folder, recipe, tokenizer) -> None:
        from qlora_pipe.export.classifier_export import write_classifier_config

        write_classifier_config(folder, recipe.classification.labels, tokenizer.pad_token_id)

    def check_merged(self, recipe, run, merged_dir, dtype) -> dict:
        from qlora_pipe.export.classifier_fidelity import verify_classifier

        return verify_classifier(recipe, run, merged_dir, dtype)

    def card_load_arguments(self, recipe) -> str:
        return f"    num_labels={len(recipe.classification.labels or [])},\n"

    def prepare_data(self, recipe, tokenizer):
        from qlora_pipe.data.classification import prepare_classification_data

        data, classes = prepare_classification_data(recipe, tokenizer)
        data.classes = classes
        return data

    def preview(self, recipe, tokenizer, rows: int, color: bool) -> str:
        from qlora_pipe.data.classification import classification_preview

        return classification_preview(recipe, tokenizer, rows)

    def with_data(self, recipe, data):
        """The classes found in the data become classification.labels (the resolved recipe keeps them, so eval
        and export know the label order)."""
        if recipe.classification.labels == data.classes:
            return recipe
        section = recipe.classification.model_copy(update={"labels": data.classes})
        return recipe.model_copy(update={"classification": section})

    def trainer_class(self, recipe) -> type:
        from qlora_pipe.training.trainer import classifier_trainer_class

        return classifier_trainer_class()

    def trainer_config(self, recipe, arguments: dict):
        """transformers' TrainingArguments: the shared fields, no SFT extras."""
        import dataclasses

        from transformers import TrainingArguments

        accepted = {f.name for f in dataclasses.fields(TrainingArguments)}
        return TrainingArguments(**{k: v for k, v in arguments.items() if k in accepted})

    def load_fresh_policy(self, recipe, tokenizer):
        from qlora_pipe.models.classifier import load_classifier

        return load_classifier(recipe, tokenizer, recipe.classification.labels)

    def callbacks(self, recipe, run, tokenizer, data) -> list:
        if data.eval is None:
            return []
        from qlora_pipe.training.classifier_scores import held_out_classifier_scores

        return [held_out_classifier_scores(recipe, run, data)]

    def held_out_eval(self, run, recipe, data, limit, batch_size: int, merged: bool, lm_eval: bool) -> dict:
        from qlora_pipe.errors import UserError
        from qlora_pipe.evaluate.classification_eval import run_classification_eval

        if lm_eval:
            raise UserError(f"eval {run.root}: --lm-eval is for text generation; a classifier is scored on labels")
        return run_classification_eval(run, recipe, data, limit, merged)

    def eval_table(self, result: dict, markdown: bool = False) -> str:
        from qlora_pipe.evaluate.classification_eval import classification_table

        return f"```\n{classification_table(result)}\n```" if markdown else classification_table(result)

    def summary(self, recipe, run) -> dict:
        from qlora_pipe.training.classifier_scores import CLASSIFIER_EVAL

        path = run.root / CLASSIFIER_EVAL
        scores = json.loads(path.read_text()) if path.is_file() else {}
        return {"method": "sft", "task": "classification", "labels": recipe.classification.labels, "held_out": scores}
