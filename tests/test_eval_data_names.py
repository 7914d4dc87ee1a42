"""`qlora-pipe eval RUN --data FILE` reads FILE through the run's data stage as its only split: every message
about those rows names it as what it is, the eval data given with --data, for every method and task."""

from __future__ import annotations

import pytest

from qlora_pipe.errors import UserError
from qlora_pipe.evaluate.classification_eval import labelled_rows
from qlora_pipe.evaluate.grpo_eval import prompts_for
from qlora_pipe.evaluate.preference_eval import pairs_for
from qlora_pipe.recipe import validate_recipe
from tests.conftest import EVAL, REPO
from tests.helpers.recipes import classifier_recipe, dpo_recipe, grpo_recipe

PROMPTS = REPO / "data/legal-qa/grpo_eval.jsonl"


def recipes(model_dir, tmp_path) -> dict:
    kto = dpo_recipe(model_dir, tmp_path, "kto")
    kto.update(method="kto")
    return {
        "grpo": (prompts_for, validate_recipe(grpo_recipe(model_dir, tmp_path)), "no usable prompt rows"),
        "dpo": (pairs_for, validate_recipe(dpo_recipe(model_dir, tmp_path)), "no usable preference pairs"),
        "kto": (pairs_for, validate_recipe(kto), "no usable KTO rows (prompt/completion/label)"),
        "classification": (labelled_rows, classifier_recipe(model_dir, tmp_path, "c"), "no usable labelled rows"),
    }


@pytest.mark.parametrize("kind", ["grpo", "dpo", "kto", "classification"])
def test_rows_of_another_kind_given_with_data_are_named_as_eval_data(kind, tokenizer, tiny_model_dir, tmp_path):
    rows_for, recipe, nothing = recipes(tiny_model_dir, tmp_path)[kind]
    with pytest.raises(UserError) as refused:
        rows_for(recipe, tokenizer, str(EVAL), None)  # SFT conversations: none is a row of this kind
    message = str(refused.value)
    assert message.startswith(f"the eval data given with --data {EVAL}: {nothing} (--data {EVAL}: 0/55 "), message
    assert "training" not in message and "train:" not in message


def test_rows_of_the_right_kind_given_with_data_are_read_whole(tokenizer, tiny_model_dir, tmp_path):
    rows, source = prompts_for(validate_recipe(grpo_recipe(tiny_model_dir, tmp_path)), tokenizer, str(PROMPTS), None)
    assert source == str(PROMPTS) and len(rows) == sum(1 for line in PROMPTS.read_text().splitlines() if line.strip())
