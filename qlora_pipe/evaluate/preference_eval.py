"""`qlora-pipe eval` of a preference run: held-out reward accuracy of the base, the starting (SFT) adapter
and the preference-tuned adapter, side by side, on the run's held-out pairs (or --data FILE of pairs).

One 4-bit base is loaded; the columns are the same model with its adapter disabled, the SFT adapter
(``model.adapter``) loaded beside the tuned one, and the tuned adapter.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.runs import RunDir, write_json_atomic

log = logging.getLogger(__name__)


def pairs_for(recipe, tokenizer, data: str | None, limit: int | None) -> tuple[list, str]:
    from qlora_pipe.data.preference import prepare_preference_data
    from qlora_pipe.data.report import given_eval_data

    section = recipe.data
    if data is not None:
        section = section.model_copy(
            update={
                "train_path": data,
                "eval_path": None,
                "sources": [],
                "eval_fraction": 0.0,
                "max_train_samples": None,
            }
        )
    name = "train" if data is None else given_eval_data(data)
    prepared = prepare_preference_data(section, tokenizer, recipe.seed, recipe.method, name)
    split = prepared.eval if prepared.eval is not None and data is None else prepared.train
    rows = [split[i] for i in range(len(split) if limit is None else min(limit, len(split)))]
    kind = "rows" if rows and "completion" in rows[0] else "pairs"
    held = prepared.eval is not None and data is None
    return rows, data or (f"held-out {kind}" if held else f"training {kind}")


def starting_adapter_problem(folder: Path) -> str | None:
    """Why the run's starting adapter (model.adapter, e.g. the SFT run) cannot be scored, or None: it may
    have been deleted or damaged since the run trained from it."""
    from qlora_pipe.models.loading import check_adapter_files

    try:
        check_adapter_files(folder)
    except UserError as exc:
        return f"the starting adapter (model.adapter) is unusable: {exc}"
    return None


def run_preference_eval(run: RunDir, recipe, data: str | None, limit: int | None) -> dict[str, Any]:
    from qlora_pipe.evaluate.reward_accuracy import held_out_scores
    from qlora_pipe.models.loading import load_run_tokenizer, load_trained_model

    started = time.time()
    tokenizer = load_run_tokenizer(run.root)
    pairs, source = pairs_for(recipe, tokenizer, data, limit)
    if not pairs:
        raise UserError(f"eval {run.root}: no usable rows in {source}")
    model = load_trained_model(recipe, run.root)
    columns: dict[str, Any] = {}
    with model.disable_adapter():
        columns["base"] = held_out_scores(model, tokenizer, pairs)
    left_out = {}
    if recipe.model.adapter:
        problem = starting_adapter_problem(Path(recipe.model.adapter))
        if problem is None:
            model.load_adapter(str(Path(recipe.model.adapter)), adapter_name="start")
            model.set_adapter("start")
            columns["sft"] = held_out_scores(model, tokenizer, pairs)
            model.set_adapter("default")
        else:  # the run still evaluates: its own adapter and the base do not need the starting one
            left_out["sft"] = problem
            log.warning("eval: the sft column is left out: %s", problem)
    columns[recipe.method] = held_out_scores(model, tokenizer, pairs)
    result = {"run": str(run.root), "method": recipe.method, "data": source, "columns": columns}
    if left_out:
        result["left_out"] = left_out
    path = run.eval_report
    write_json_atomic(path, result)
    return {**result, "path": str(path), "seconds": time.time() - started}


def preference_table(result: dict[str, Any]) -> str:
    """The columns side by side, then any column left out and why."""
    notes = [f"{name}: left out ({why})" for name, why in result.get("left_out", {}).items()]
    return "\n".join([score_table(result), *notes])


def score_table(result: dict[str, Any]) -> str:
    names = list(result["columns"])
    columns = list(result["columns"].values())
    header = f"{'':24}" + "".join(f"{name:>12}" for name in names)
    if "label_auc" in columns[0]:
        return "\n".join(
            [
                f"held-out label separation on {columns[0]['rows']} {result['data']} "
                f"({columns[0]['desirable']} desirable, {columns[0]['undesirable']} undesirable completions):",
                header,
                f"{'label AUC':24}" + "".join(f"{c['label_auc']:>12.3f}" for c in columns),
                f"{'desirable logp/token':24}" + "".join(f"{c['desirable_logprob']:>12.3f}" for c in columns),
                f"{'undesirable logp/token':24}" + "".join(f"{c['undesirable_logprob']:>12.3f}" for c in columns),
            ]
        )
    lines = [
        f"held-out reward accuracy on {columns[0]['pairs']} {result['data']} "
        "(chosen answer more likely than rejected):",
        header,
        f"{'reward accuracy':24}" + "".join(f"{100 * c['reward_accuracy']:>11.1f}%" for c in columns),
        f"{'mean margin (nats)':24}" + "".join(f"{c['mean_margin']:>12.3f}" for c in columns),
    ]
    return "\n".join(lines)
