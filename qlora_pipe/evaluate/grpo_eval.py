"""`qlora-pipe eval` of a GRPO run: on held-out prompts (or --data FILE of prompt rows), greedy answers of
the base, the starting adapter (model.adapter) and the GRPO-tuned adapter, each reward's mean and the
share fully correct, side by side.

One 4-bit base is loaded; the columns are the same model with its adapter disabled, the starting adapter
loaded beside the tuned one, and the tuned adapter (as for preference runs, evaluate/preference_eval.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.runs import RunDir, write_json_atomic

log = logging.getLogger(__name__)


def prompts_for(recipe, tokenizer, data: str | None, limit: int | None) -> tuple[list, str]:
    from qlora_pipe.data.prompts import prepare_prompt_data
    from qlora_pipe.data.report import given_eval_data

    if data is not None:
        section = recipe.data.model_copy(
            update={
                "train_path": data,
                "eval_path": None,
                "sources": [],
                "eval_fraction": 0.0,
                "max_train_samples": None,
            }
        )
        recipe = recipe.model_copy(update={"data": section})
    prepared = prepare_prompt_data(recipe, tokenizer, "train" if data is None else given_eval_data(data))
    held = prepared.held_out_prompts is not None and data is None
    split = prepared.held_out_prompts if held else prepared.train
    rows = [split[i] for i in range(len(split) if limit is None else min(limit, len(split)))]
    return rows, data or ("held-out prompts" if held else "training prompts")


def run_grpo_eval(run: RunDir, recipe, data: str | None, limit: int | None, batch_size: int) -> dict[str, Any]:
    from qlora_pipe.evaluate.preference_eval import starting_adapter_problem
    from qlora_pipe.evaluate.reward_scores import held_out_rewards
    from qlora_pipe.models.loading import load_run_tokenizer, load_trained_model

    started = time.time()
    tokenizer = load_run_tokenizer(run.root)
    rows, source = prompts_for(recipe, tokenizer, data, limit)
    if not rows:
        raise UserError(f"eval {run.root}: no usable rows in {source}")
    model = load_trained_model(recipe, run.root)
    columns: dict[str, Any] = {}
    with model.disable_adapter():
        columns["base"] = held_out_rewards(model, tokenizer, recipe, rows, batch_size)
    left_out = {}
    if recipe.model.adapter:
        problem = starting_adapter_problem(Path(recipe.model.adapter))
        if problem is None:
            model.load_adapter(str(Path(recipe.model.adapter)), adapter_name="start")
            model.set_adapter("start")
            columns["start"] = held_out_rewards(model, tokenizer, recipe, rows, batch_size)
            model.set_adapter("default")
        else:
            left_out["start"] = problem
            log.warning("eval: the start column is left out: %s", problem)
    columns["grpo"] = held_out_rewards(model, tokenizer, recipe, rows, batch_size)
    result = {"run": str(run.root), "method": "grpo", "data": source, "columns": columns}
    if left_out:
        result["left_out"] = left_out
    write_json_atomic(run.eval_report, result)
    return {**result, "path": str(run.eval_report), "seconds": time.time() - started}
