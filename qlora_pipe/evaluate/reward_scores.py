"""GRPO runs scored on held-out prompts: greedy answers, each reward's mean, and the share fully correct.

A prompt is fully correct when every reward is at its best: 1 for exact_match, token_f1, regex, json,
tool_call and user rewards (a user reward that scores on another scale is reported by its mean alone and
counts as correct at 1 or more), 0 for the length penalty; a reward that returned None (not applicable)
does not count against it. A prompt no reward applied to is in no mean. Used by training (before and after, in
summary.json) and by `qlora-pipe eval` (base, starting adapter, tuned).
"""

from __future__ import annotations

from typing import Any

from qlora_pipe.models.generation import chat_prompt_ids, generate_greedy
from qlora_pipe.recipe import Recipe

EXAMPLES = 5  # answers kept in the result, with their rewards


def _best(function: str, value: float | None) -> bool:
    if value is None:  # a reward that does not apply to the row does not make it wrong
        return True
    return value >= 0 if function == "length" else value >= 1


def held_out_rewards(model, tokenizer, recipe: Recipe, rows, batch_size: int = 8) -> dict[str, Any]:
    """Greedy answers (grpo.max_completion_length tokens at most) to ``rows`` (prompt rows), rewarded."""
    from qlora_pipe.data.prompts import row_tools
    from qlora_pipe.rewards.functions import guarded, prompt_key, resolve_rewards

    rows = list(rows)
    prompts = [row["prompt"] for row in rows]
    ids = [chat_prompt_ids(tokenizer, row["prompt"], row_tools(row)) for row in rows]
    answers = generate_greedy(model, tokenizer, ids, recipe.grpo.max_completion_length, batch_size, "rewards")
    completions = [[{"role": "assistant", "content": a.text}] for a in answers]
    completion_ids = [tokenizer(a.text, add_special_tokens=False)["input_ids"] for a in answers]
    columns = {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"}
    numbers = {prompt_key(p): n for n, p in enumerate(prompts, start=1)}
    scores: dict[str, list[float | None]] = {}
    for reward in resolve_rewards(recipe):
        call = guarded(reward, numbers, "held-out")
        values = call(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            **columns,
            trainer_state=None,
            log_extra=lambda *a, **k: None,
            log_metric=lambda *a, **k: None,
        )
        scores[reward.label] = values
    specs = {r.label(): r for r in recipe.grpo.rewards}
    # A prompt no reward applied to (each returned None) is unscorable: TRL leaves it out of the reward's
    # mean, and so do the weighted reward and the share fully correct (None when no prompt was scorable).
    scored = [i for i in range(len(rows)) if any(values[i] is not None for values in scores.values())]
    correct = [all(_best(specs[label].function, values[i]) for label, values in scores.items()) for i in scored]
    weighted = [sum(specs[label].weight * (values[i] or 0.0) for label, values in scores.items()) for i in scored]
    return {
        "prompts": len(rows),
        "rewards": {label: _mean(values) for label, values in scores.items()},
        "weighted_reward": _mean(weighted),
        "fully_correct": _mean([float(c) for c in correct]),
        "truncated": sum(not a.stopped for a in answers) / len(rows),
        "examples": [
            {"prompt": prompts[i][-1]["content"], "answer": answers[i].text, **{k: v[i] for k, v in scores.items()}}
            for i in range(min(EXAMPLES, len(rows)))
        ],
    }


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def rewards_table(columns: dict[str, dict[str, Any]], markdown: bool = False) -> str:
    """Held-out rewards side by side (base, starting adapter, tuned): each reward's mean, the weighted sum,
    the share fully correct."""
    names = list(columns)
    first = next(iter(columns.values()))
    rows = [(f"reward {label} (mean)", lambda c, k=label: c["rewards"][k]) for label in first["rewards"]]
    rows += [("weighted reward", lambda c: c["weighted_reward"]), ("fully correct", lambda c: c["fully_correct"])]
    rows += [("truncated answers", lambda c: c["truncated"])]
    title = f"held-out prompts: {first['prompts']} (greedy)"
    if markdown:
        lines = [f"| {title} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {label} | " + " | ".join(_show(get(columns[n])) for n in names) + " |" for label, get in rows]
        return "\n".join(lines)
    width = max(len(label) for label, _ in rows) + 2
    lines = [title, " " * width + "".join(f"{n:>12}" for n in names)]
    for label, get in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{_show(get(columns[n])):>12}" for n in names))
    return "\n".join(lines)


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
