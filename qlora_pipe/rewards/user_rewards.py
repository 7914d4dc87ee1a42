"""The rewards of a GRPO recipe as far as the data needs them: user rewards found, imported and checked,
and the columns every row must carry for each reward. Shared by the data stage (which rows to keep, what
the report says each reward reads) and the training stage (the rewards TRL calls), so neither reaches
into the other.

TRL calls each reward with keyword arguments only: prompts, completions, completion_ids, every other
column of the rows (one list each), trainer_state, log_extra and log_metric. A user reward therefore
takes ``**kwargs`` (and may name any of these it uses); the names it requires beyond TRL's own must be
columns of every row.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.recipe.grpo import BUILTIN_REWARDS, RewardSection
from qlora_pipe.rewards.user_code import run_user_code

TRL_ARGUMENTS = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"}


def load_user_function(where: str, spec: str) -> Callable[..., Any]:
    """The function a user reward names (``module:function`` or ``path/to/file.py:function``), imported."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UserError(f"{where}: file {target} not found (paths are relative to the working directory)")
        if str(path.resolve().parent) not in sys.path:  # its own modules beside it import, as for a script
            sys.path.insert(0, str(path.resolve().parent))
        module_name = f"qlora_pipe_user_rewards.{path.stem}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        _import(where, target, lambda: loader.loader.exec_module(module))
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # `qlora-pipe` as a console script: find modules beside the recipe
        module = _import(where, target, lambda: importlib.import_module(target))
    function = getattr(module, name, None)
    if function is None:
        raise UserError(f"{where}: {target} has no function {name}")
    if not callable(function):
        raise UserError(f"{where}: {spec} is a {type(function).__name__}, not a function")
    return function


def _import(where: str, target: str, load: Callable[[], Any]) -> Any:
    """``load()``: what the import raises, sys.exit() and KeyboardInterrupt included, in one line."""
    try:
        return run_user_code(f"{where}: importing {target}", load)
    except UserError as exc:
        cause = exc.__cause__
        missing = getattr(cause, "name", None) if isinstance(cause, ModuleNotFoundError) else None
        if missing and (target == missing or target.startswith(f"{missing}.")):  # not a module it imports
            raise UserError(f"{where}: module {target} not found ({cause})") from cause
        if isinstance(cause, SystemExit):  # a script's top-level code runs on import
            raise UserError(f"{exc}; put a script's own code under if __name__ == '__main__':") from cause
        raise


def required_names(where: str, spec: str, function: Callable[..., Any]) -> tuple[str, ...]:
    """The names the function requires beyond TRL's own (they must be columns of every row); refuses a
    signature TRL cannot call."""
    if inspect.iscoroutinefunction(function):
        raise UserError(f"{where}: {spec} is async; give a plain function")
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: {spec} has no readable signature ({exc})") from exc
    positional_only = [p.name for p in parameters if p.kind is p.POSITIONAL_ONLY]
    if positional_only:
        raise UserError(f"{where}: {spec} takes {positional_only[0]} positionally only; TRL passes keywords")
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        raise UserError(f"{where}: {spec} must accept **kwargs (TRL passes prompts, completions, columns, ...)")
    required = [p.name for p in parameters if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    required += [p.name for p in parameters if p.default is p.empty and p.kind is p.KEYWORD_ONLY]
    return tuple(n for n in required if n not in TRL_ARGUMENTS)


def user_reward(index: int, spec: RewardSection) -> tuple[Callable[..., Any], tuple[str, ...]]:
    """A user reward's function and the columns it requires (imported and checked)."""
    where = f"grpo.rewards.{index}.function"
    function = load_user_function(where, spec.function)
    return function, required_names(where, spec.function, function)


def reward_columns(
    rewards: list[RewardSection], recorded: dict[str, list[str]] | None = None
) -> list[tuple[str, tuple[str, ...]]]:
    """(label, the columns every row must have) for each reward: a built-in's reference column, the names a
    user reward requires (its module is imported to read them, unless ``recorded``: label -> the columns a
    run's data report recorded, which is how export and chat read a run's data without the reward code)."""
    found = []
    for index, spec in enumerate(rewards):
        if spec.function in BUILTIN_REWARDS:
            column = spec.reference_column()
            found.append((spec.label(), (column,) if column else ()))
        elif recorded is not None and spec.label() in recorded:
            found.append((spec.label(), tuple(recorded[spec.label()])))
        else:
            found.append((spec.label(), user_reward(index, spec)[1]))
    return found
