"""A configured eval split (data.eval_path, eval_sources, eval_fraction) whose rows are all dropped is an error
with the reasons, in one line (exit 2), for every method's data stage: it was left out without a word (no
eval line in the report, GRPO's held_out_rewards empty, SFT's eval loss missing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import recipe_dict
from tests.helpers.data import chat, write_jsonl
from tests.helpers.recipes import PROMPTS_EVAL, dpo_recipe, grpo_recipe, write_rows


def sft_collect(model: Path, tmp_path: Path) -> tuple[dict, str]:
    rows = [{"messages": [{"role": "user", "content": "Is a tort a crime?"}]}] * 3  # no answer to learn
    raw = recipe_dict(model, tmp_path / "runs")
    raw["data"]["eval_path"] = write_jsonl(tmp_path / "eval.jsonl", rows)
    return raw, "0/3 rows kept (dropped: 3 no assistant turn"


def sft_tokens(model: Path, tmp_path: Path) -> tuple[dict, str]:
    rows = [chat(f"Question {i}?", "word " * 400) for i in range(2)]  # longer than data.max_length: dropped
    raw = recipe_dict(model, tmp_path / "runs")
    raw["data"]["eval_path"] = write_jsonl(tmp_path / "eval.jsonl", rows)
    return raw, "0/2 rows kept (dropped: 2 longer than max_length"


def grpo(model: Path, tmp_path: Path) -> tuple[dict, str]:
    rows = [{k: v for k, v in json.loads(line).items() if k != "answer"} for line in PROMPTS_EVAL.open()]
    raw = grpo_recipe(model, tmp_path, rewards=[{"function": "exact_match", "name": "area"}])
    raw["data"].update(eval_path=write_jsonl(tmp_path / "eval.jsonl", rows[:4]), max_eval_samples=None)
    return raw, "0/4 prompts kept (dropped: 4 no answer column (reward area reads it))"


def dpo(model: Path, tmp_path: Path) -> tuple[dict, str]:
    rows = [{"prompt": "What is a tort?", "chosen": "A civil wrong."}] * 2  # no rejected answer
    raw = dpo_recipe(model, tmp_path, eval_path=Path(write_jsonl(tmp_path / "eval.jsonl", rows)))
    return raw, "0/2 rows kept (dropped: 2 "


def classification(model: Path, tmp_path: Path) -> tuple[dict, str]:
    train, _ = write_rows(tmp_path)
    raw = recipe_dict(model, tmp_path / "runs")
    raw.update(task="classification")
    rows = [{"text": "Is a tax a crime?", "label": "tax"}] * 2  # a class the recipe does not list
    raw["classification"] = {"labels": ["contracts", "criminal", "property"]}
    raw["data"].update(train_path=str(train), eval_path=write_jsonl(tmp_path / "eval.jsonl", rows), max_length=32)
    return raw, "0/2 rows kept (dropped: 2 label not in classification.labels"


@pytest.mark.parametrize("case", [sft_collect, sft_tokens, grpo, dpo, classification])
def test_an_eval_split_whose_rows_are_all_dropped_is_an_error_with_the_reasons(tiny_model_dir, tmp_path, capsys, case):
    from qlora_pipe.cli import main

    raw, reasons = case(tiny_model_dir, tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(raw))
    commands = (["data"], ["train"]) if case is grpo else (["data"],)  # train runs the same stage, first
    for command in commands:
        assert main([*command, str(recipe)]) == 2, command
        err = capsys.readouterr().err
        assert "Traceback" not in err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"error: eval data {raw['data']['eval_path']}: no usable rows: ") and reasons in line
