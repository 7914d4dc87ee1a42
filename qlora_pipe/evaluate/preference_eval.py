"""`qlora-pipe eval` of a preference run: held-out reward accuracy of the base, the starting (SFT) adapter
and the preference-tuned adapter, side by side, on the run's held-out pairs (or --data FILE of pairs).

One 4-bit base is loaded; the columns are the same model with its adapter disabled, the SFT adapter
(``model.adapter``) loaded beside the tuned one, and the tuned adapter.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.runs import RunDir, write_json_atomic


def pairs_for(recipe, tokenizer, data: str | None, limit: int | None) -> tuple[list, str]:
    from qlora_pipe.data.preference import prepare_preference_data

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
    prepared = prepare_preference_data(section, tokenizer, recipe.seed, recipe.method)
    split = prepared.eval if prepared.eval is not None and data is None else prepared.train
    rows = [split[i] for i in range(len(split) if limit is None else min(limit, len(split)))]
    return rows, data or ("held-out pairs" if prepared.eval is not None and data is None else "training pairs")


def run_preference_eval(run: RunDir, recipe, data: str | None, limit: int | None) -> dict[str, Any]:
    from qlora_pipe.evaluate.reward_accuracy import reward_accuracy
    from qlora_pipe.model import load_run_tokenizer, load_trained_model

    started = time.time()
    tokenizer = load_run_tokenizer(run.root)
    pairs, source = pairs_for(recipe, tokenizer, data, limit)
    if pairs and "chosen" not in pairs[0]:
        raise UserError(
            f"eval {run.root}: reward accuracy needs prompt/chosen/rejected pairs; give --data with pairs "
            "(TRL's KTO metrics for unpaired rows are in metrics.jsonl)"
        )
    model = load_trained_model(recipe, run.root)
    columns: dict[str, Any] = {}
    with model.disable_adapter():
        columns["base"] = reward_accuracy(model, tokenizer, pairs)
    if recipe.model.adapter:
        model.load_adapter(str(Path(recipe.model.adapter)), adapter_name="start")
        model.set_adapter("start")
        columns["sft"] = reward_accuracy(model, tokenizer, pairs)
        model.set_adapter("default")
    columns[recipe.method] = reward_accuracy(model, tokenizer, pairs)
    result = {"run": str(run.root), "method": recipe.method, "data": source, "columns": columns}
    path = run.eval_report
    write_json_atomic(path, result)
    return {**result, "path": str(path), "seconds": time.time() - started}


def preference_table(result: dict[str, Any]) -> str:
    names = list(result["columns"])
    pairs = next(iter(result["columns"].values()))["pairs"]
    lines = [
        f"held-out reward accuracy on {pairs} {result['data']} (chosen answer more likely than rejected):",
        f"{'':24}" + "".join(f"{name:>12}" for name in names),
        f"{'reward accuracy':24}"
        + "".join(f"{100 * c['reward_accuracy']:>11.1f}%" for c in result["columns"].values()),
        f"{'mean margin (nats)':24}" + "".join(f"{c['mean_margin']:>12.3f}" for c in result["columns"].values()),
    ]
    return "\n".join(lines)
