"""``model.adapter``: the finished run whose adapter a new run continues, checked before any model loads.

Export, eval and chat refuse a run that did not finish or whose adapter is missing or damaged; continuing
training from one is refused the same way, in one line, instead of a Hub-id or safetensors traceback from
PEFT. The adapter must also be a text-generation adapter: a classifier's (PEFT task SEQ_CLS, with its
head in modules_to_save) would load into a causal LM, train nothing useful and save its head names
again. The base it was trained on is checked by the caller (training/method.py, starting_adapter).
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import Recipe
from qlora_pipe.runs import RunDir

# PEFT's task type of the adapters a causal-LM run trains (LoraConfig(task_type="CAUSAL_LM")); adapters
# saved without a task type load the same way.
CAUSAL_LM_TASKS = (None, "CAUSAL_LM")


def check_start_run(recipe: Recipe, folder: Path) -> None:
    """Refuse, in one line, a model.adapter that is not a finished run of a text-generation adapter."""
    from qlora_pipe.models.loading import check_adapter_files

    if not folder.is_dir():
        raise UserError(f"model.adapter: {folder} does not exist (name a finished run directory)")
    run = RunDir(folder)
    if not run.summary.is_file():
        state = f"status: {run.state()}" if run.is_run_directory() else "no summary.json"
        raise UserError(
            f"model.adapter: {folder} is not a finished run ({state}); finish or resume it first, "
            "or name a finished run"
        )
    try:
        check_adapter_files(folder)
    except UserError as exc:
        raise UserError(f"model.adapter: {exc}") from exc
    try:
        task = json.loads(run.adapter_config.read_text()).get("task_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"model.adapter: {run.adapter_config} is not valid JSON ({exc})") from exc
    if task not in CAUSAL_LM_TASKS:
        kind = "a classifier's" if task == "SEQ_CLS" else f"a {task}"
        raise UserError(
            f"model.adapter: {folder} holds {kind} adapter; method {recipe.method} continues a text-generation "
            "(task: causal_lm) run"
        )
