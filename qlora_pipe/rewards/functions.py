"""The rewards of a GRPO recipe as TRL reward functions: user rewards found and checked before anything
loads (qlora_pipe/rewards/user_rewards.py, shared with the data stage), every reward guarded so that one that
raises or returns a non-number stops the run in one line naming the reward and the row.

TRL calls each reward with keyword arguments only: prompts, completions, completion_ids, every other
column of the rows (one list each), trainer_state, log_extra and log_metric. A user reward therefore
takes ``**kwargs`` (and may name any of these it uses) and returns one number per completion (None: not
applicable to that row, as TRL allows).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import Recipe
from qlora_pipe.recipe.grpo import BUILTIN_REWARDS, RewardSection
from qlora_pipe.rewards.builtin import builtin_reward, completion_text
from qlora_pipe.rewards.user_code import USER_CODE_ERRORS, ctrl_c_watched, is_code_failure, what_happened
from qlora_pipe.rewards.user_rewards import user_reward


@dataclass(frozen=True)
class ResolvedReward:
    spec: RewardSection
    function: Callable[..., Any]
    columns: tuple[str, ...]  # columns every row must have: the reference column, a user reward's required names

    @property
    def label(self) -> str:
        return self.spec.label()


def resolve_rewards(recipe: Recipe) -> list[ResolvedReward]:
    """Each reward of the recipe as a function: built-ins made, user functions imported and checked."""
    resolved = []
    for index, spec in enumerate(recipe.grpo.rewards):
        if spec.function in BUILTIN_REWARDS:
            column = spec.reference_column()
            resolved.append(ResolvedReward(spec, builtin_reward(spec), (column,) if column else ()))
            continue
        resolved.append(ResolvedReward(spec, *user_reward(index, spec)))
    return resolved


def _quote(prompt: Any) -> str:
    """The end of the prompt's last turn (prompts often share an instruction and differ at the end)."""
    text = prompt[-1].get("content", "") if isinstance(prompt, list) and prompt else completion_text(prompt)
    text = " ".join(str(text).split())
    return repr(("..." if len(text) > 60 else "") + text[-60:])


def _problem(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        return f"returned {type(value).__name__} {value!r:.40}, not a number"
    if not math.isfinite(float(value)):
        return f"returned {value}, not a finite number"
    return None


def guarded(reward: ResolvedReward, rows: dict[str, int], split: str = "training") -> Callable[..., list[float]]:
    """The reward as TRL calls it, named by its label (TRL's metrics: rewards/<label>/mean). ``rows`` maps a
    prompt's key to its row number, for the one-line error."""
    function, label = reward.function, reward.label
    source = reward.spec.function

    def where(prompt: Any) -> str:
        number = rows.get(prompt_key(prompt))
        return f"{split} prompt {number} ({_quote(prompt)})" if number else f"{split} prompt {_quote(prompt)}"

    def call(prompts, completions, completion_ids, **columns) -> list[float]:
        with ctrl_c_watched() as ctrl_c:
            try:
                values = function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            except USER_CODE_ERRORS as exc:  # sys.exit() and a KeyboardInterrupt it raised are its failures too
                if not is_code_failure(exc, ctrl_c):
                    raise
                row = _failing_row(function, prompts, completions, completion_ids, columns)
                raise UserError(f"reward {label} ({source}) {what_happened(exc)} on {where(prompts[row])}") from None
        if not isinstance(values, list | tuple) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, list | tuple) else type(values).__name__
            raise UserError(
                f"reward {label} ({source}) returned {got} for {len(completions)} completions; "
                f"it must return one number per completion (first: {where(prompts[0])})"
            )
        for index, value in enumerate(values):
            if problem := _problem(value):
                raise UserError(f"reward {label} ({source}) {problem} on {where(prompts[index])}")
        return [None if v is None else float(v) for v in values]

    call.__name__ = label
    return call


def _failing_row(function, prompts, completions, completion_ids, columns) -> int:
    """The first completion the reward fails on alone (the whole batch's first when none fails alone)."""
    for i in range(len(completions)):
        one = {k: v[i : i + 1] if isinstance(v, list) and len(v) == len(completions) else v for k, v in columns.items()}
        try:
            function(
                prompts=prompts[i : i + 1],
                completions=completions[i : i + 1],
                completion_ids=completion_ids[i : i + 1],
                **one,
            )
        except USER_CODE_ERRORS:  # within the caller's watch: a Ctrl-C meanwhile is told apart there
            return i
    return 0


def prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True)


def trl_rewards(recipe: Recipe, prompts: list[Any], split: str = "training") -> tuple[list, list[float]]:
    """TRL's reward_funcs and reward_weights for the recipe; ``prompts`` in row order (for error messages)."""
    rows = {prompt_key(p): number for number, p in enumerate(prompts, start=1)}
    resolved = resolve_rewards(recipe)
    return [guarded(r, rows, split) for r in resolved], [r.spec.weight for r in resolved]
