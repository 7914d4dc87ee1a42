"""What differs between training methods: the data stage, the trainer class, and where the adapter starts.

sft: supervised rows, a fresh adapter (PipeTrainer over TRL's SFTTrainer). dpo: preference pairs
(qlora_pipe/data/preference.py) through TRL's DPOTrainer. With a LoRA policy the reference costs no
second model: TRL copies the starting adapter under the name "ref" (a fresh adapter is zero, so the
reference is the base; a continued SFT adapter makes the SFT model the reference).
``model.adapter`` continues training a finished run's adapter, on the same 4-bit base.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import Recipe

log = logging.getLogger(__name__)


def prepare_method_data(recipe: Recipe, tokenizer):
    if recipe.task == "classification":
        from qlora_pipe.data.classification import prepare_classification_data

        data, classes = prepare_classification_data(recipe, tokenizer)
        data.classes = classes
        return data
    if recipe.method == "grpo":
        from qlora_pipe.data.prompts import prepare_prompt_data

        return prepare_prompt_data(recipe, tokenizer)
    if recipe.method != "sft":
        from qlora_pipe.data.preference import prepare_preference_data

        return prepare_preference_data(recipe.data, tokenizer, recipe.seed, recipe.method)
    from qlora_pipe.data.prepare import prepare_data

    return prepare_data(recipe.data, tokenizer, recipe.seed)


def with_data_classes(recipe: Recipe, data) -> Recipe:
    """Classification: the classes found in the data become classification.labels (the resolved recipe
    keeps them, so eval and export know the label order)."""
    if recipe.task != "classification" or recipe.classification.labels == data.classes:
        return recipe
    section = recipe.classification.model_copy(update={"labels": data.classes})
    return recipe.model_copy(update={"classification": section})


def trainer_class(recipe: Recipe):
    from qlora_pipe.training.trainer import PipeTrainer, classifier_trainer_class, preference_trainer_class

    if recipe.task == "classification":
        return classifier_trainer_class()
    if recipe.method == "grpo":
        from qlora_pipe.training.grpo import grpo_trainer_class

        return grpo_trainer_class(recipe)
    return PipeTrainer if recipe.method == "sft" else preference_trainer_class(recipe.method)


def starting_adapter(recipe: Recipe) -> Path | None:
    """The adapter folder named by model.adapter, checked: it exists and was trained on this base."""
    if recipe.model.adapter is None:
        return None
    from qlora_pipe.training.adapter_start import check_start_run

    folder = Path(recipe.model.adapter)
    check_start_run(recipe, folder)  # a finished run, its adapter whole, a text-generation adapter
    config = folder / "adapter_config.json"
    base = json.loads(config.read_text()).get("base_model_name_or_path", "")
    from qlora_pipe.base_record import check_same_base
    from qlora_pipe.gguf_source import source_of
    from qlora_pipe.model import model_location
    from qlora_pipe.runs import RunDir

    wanted = model_location(recipe.model.name_or_path)  # a GGUF base: the folder converted from it
    converted = [source_of(f) for f in (base, wanted)]  # both converted from GGUF files: the same file's?
    same = (
        base in (wanted, recipe.model.name_or_path)
        or (Path(base).exists() and Path(wanted).exists() and Path(base).resolve() == Path(wanted).resolve())
        or (all(converted) and converted[0]["sha256"] == converted[1]["sha256"])
    )
    if not same:
        raise UserError(f"model.adapter: {folder} was trained on {base}, not on model.name_or_path {wanted}")
    check_same_base(RunDir(folder), recipe, "model.adapter:")  # the same name, but is it the same weights?
    return folder


def load_policy(recipe: Recipe, tokenizer):
    """The 4-bit base with the adapter to train: model.adapter's (trainable), else a fresh one."""
    from qlora_pipe.model import TrainableModel, load_base_model, load_trainable_model, prepare_frozen_base

    folder = starting_adapter(recipe)
    if recipe.task == "classification" and folder is None:
        from qlora_pipe.classifier import load_classifier

        return load_classifier(recipe, tokenizer, recipe.classification.labels)
    if folder is None:
        return load_trainable_model(recipe, tokenizer)[1]
    from peft import PeftModel

    base = load_base_model(recipe)
    if base.config.pad_token_id is None or base.config.pad_token_id == tokenizer.eos_token_id:
        base.config.pad_token_id = tokenizer.pad_token_id
    base = prepare_frozen_base(base, recipe.training.gradient_checkpointing)
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("continuing the adapter of %s: %s trainable params", folder, f"{trainable:,}")
    return TrainableModel(model, trainable, total)


PREFERENCE_EVAL = "preference_eval.json"


def method_callbacks(recipe: Recipe, run, tokenizer, data) -> list:
    """For preference runs with held-out rows: reward accuracy (pairs) or label separation (KTO's unpaired
    rows) before training and after it."""
    if recipe.task == "classification" and data.eval is not None:
        from qlora_pipe.training.classifier_scores import held_out_classifier_scores

        return [held_out_classifier_scores(recipe, run, data)]
    if recipe.method == "grpo":
        from qlora_pipe.training.grpo import held_out_callback

        return [held_out_callback(recipe, run, tokenizer, data)] if data.held_out_prompts is not None else []
    if recipe.method == "sft" or data.eval is None:
        return []
    from qlora_pipe.evaluate.reward_accuracy import held_out_scores
    from qlora_pipe.training.callbacks import HeldOutBeforeAfter

    path = run.root / PREFERENCE_EVAL

    return [HeldOutBeforeAfter(path, lambda model: held_out_scores(model, tokenizer, data.eval))]


def method_summary(recipe: Recipe, run) -> dict:
    """The method and its settings for summary.json, with the held-out scores before/after: reward accuracy
    for pairs, label separation for KTO's unpaired rows."""
    if recipe.task == "classification":
        from qlora_pipe.training.classifier_scores import CLASSIFIER_EVAL

        path = run.root / CLASSIFIER_EVAL
        scores = json.loads(path.read_text()) if path.is_file() else {}
        return {"method": "sft", "task": "classification", "labels": recipe.classification.labels, "held_out": scores}
    if recipe.method == "sft":
        return {"method": "sft"}
    if recipe.method == "grpo":
        from qlora_pipe.training.grpo import grpo_summary

        return grpo_summary(recipe, run)
    path = run.root / PREFERENCE_EVAL
    scores = json.loads(path.read_text()) if path.is_file() else {}
    unpaired = "label_auc" in scores.get("before", {})
    return {
        "method": recipe.method,
        "preference": recipe.preference.model_dump(),
        "started_from_adapter": recipe.model.adapter,
        ("held_out_label_separation" if unpaired else "held_out_reward_accuracy"): scores,
    }
