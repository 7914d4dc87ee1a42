"""`qlora-pipe eval --lm-eval TASKS`: the same two models handed to EleutherAI's lm-evaluation-harness.

Optional: lm-eval is not a dependency. Its tasks download their data sets from the Hub on first use.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError

INSTALL_HINT = "pip install 'lm-eval[hf]'"


def parse_tasks(tasks: str, include: str | None = None) -> list[str]:
    """Comma-separated task names, checked against lm-eval's task registry (and ``include``, a folder
    of task YAML files) before any model is loaded: an unknown name is a one-line error, not a
    traceback after the base model's whole evaluation."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError("eval --lm-eval: give one or more task names, e.g. --lm-eval arc_easy,hellaswag")
    if include is not None and not Path(include).is_dir():
        raise UserError(f"eval --lm-eval-include {include}: not a folder of lm-eval task files")
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"eval --lm-eval: lm-evaluation-harness is not installed; {INSTALL_HINT}")
    known = known_tasks(include)
    unknown = [name for name in names if name not in known]
    if unknown:
        hints = {name: difflib.get_close_matches(name, known, n=3) for name in unknown}
        said = "; ".join(f"{n} (close: {', '.join(h)})" if h else n for n, h in hints.items())
        raise UserError(f"eval --lm-eval: lm-eval has no task {said}; `lm_eval ls tasks` lists them")
    return names


def known_tasks(include: str | None) -> list[str]:
    """Every task, group and tag lm-eval knows (its own, plus the YAML files under ``include``)."""
    from lm_eval.tasks import TaskManager

    return list(TaskManager(include_path=include).all_tasks)


def run_lm_eval(
    model, tokenizer, tasks: list[str], batch_size: int, limit: int | None, include: str | None = None
) -> dict[str, dict[str, Any]]:
    """Scores per task of an already-loaded model (lm-eval's HFLM wraps it as it is: 4-bit, adapter and all)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=include) if include else None
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, limit=limit, task_manager=task_manager)["results"]
    return {task: metrics_only(scores) for task, scores in results.items()}


def metrics_only(scores: dict[str, Any]) -> dict[str, float]:
    """lm-eval's scores without its bookkeeping (alias, sample counts, standard errors)."""
    skip = ("stderr", "alias", "samples", "sample_len", "sample_count")
    return {
        k: v
        for k, v in scores.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and not any(word in k for word in skip)
    }


def lm_eval_table(base: dict[str, dict[str, Any]], tuned: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'lm-eval task / metric':40}  {'base':>10}  {'tuned':>10}"]
    for task, scores in base.items():
        for metric, value in scores.items():
            other = tuned.get(task, {}).get(metric)
            shown = "-" if other is None else f"{other:.4f}"
            lines.append(f"{task + ' ' + metric:40}  {value:>10.4f}  {shown:>10}")
    return "\n".join(lines)
