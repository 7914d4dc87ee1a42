"""`qlora-pipe eval --lm-eval TASKS`: the same two models handed to EleutherAI's lm-evaluation-harness.

Optional: lm-eval is not a dependency. Its tasks download their data sets from the Hub on first use.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from qlora_pipe.errors import UserError

INSTALL_HINT = "pip install 'lm-eval[hf]'"


def parse_tasks(tasks: str) -> list[str]:
    """Comma-separated task names; checks that lm-eval is importable, before any model is loaded."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError("eval --lm-eval: give one or more task names, e.g. --lm-eval arc_easy,hellaswag")
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"eval --lm-eval: lm-evaluation-harness is not installed; {INSTALL_HINT}")
    return names


def run_lm_eval(model, tokenizer, tasks: list[str], batch_size: int, limit: int | None) -> dict[str, dict[str, Any]]:
    """Scores per task of an already-loaded model (lm-eval's HFLM wraps it as it is: 4-bit, adapter and all)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, limit=limit)["results"]
    return {
        task: {k: v for k, v in scores.items() if isinstance(v, int | float) and "stderr" not in k}
        for task, scores in results.items()
    }


def lm_eval_table(base: dict[str, dict[str, Any]], tuned: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'lm-eval task / metric':40}  {'base':>10}  {'tuned':>10}"]
    for task, scores in base.items():
        for metric, value in scores.items():
            other = tuned.get(task, {}).get(metric)
            shown = "-" if other is None else f"{other:.4f}"
            lines.append(f"{task + ' ' + metric:40}  {value:>10.4f}  {shown:>10}")
    return "\n".join(lines)
