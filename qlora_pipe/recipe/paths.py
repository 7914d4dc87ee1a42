"""The local paths of a recipe made absolute, once, against the working directory the recipe is loaded in.

Relative paths in a recipe are relative to the working directory. A run records its recipe with them resolved
(recipe.resolved.yaml), so export, eval, chat and push find the base model folder, the data files, the chat
template file, the cache and the reward files from any directory. Resolved: model.name_or_path (a local
folder or GGUF file; a Hub id stays), model.adapter, data.train_path / eval_path, every source's path (and a
hub source that is a local dataset folder), data.chat_template (a template file; a built-in name stays),
data.cache_dir, and each user reward (file.py:function, and module:function when the module is a file in the
working directory, which becomes its file; an installed or package module stays as Python imports it).
output_dir stays as written: runs are found by the paths the commands are given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_pipe.recipe.grpo import BUILTIN_REWARDS
from qlora_pipe.recipe.model_source import is_local

if TYPE_CHECKING:
    from qlora_pipe.recipe.schema import DataSection, Recipe, SourceSection


def absolute(path: str) -> str:
    """``path`` with ~ expanded, made absolute against the working directory (symbolic links kept)."""
    return os.path.abspath(os.path.expanduser(path))


def resolve_paths(recipe: Recipe) -> Recipe:
    """The recipe with its local paths absolute (see above); a recipe already resolved comes back equal."""
    model = recipe.model
    name = absolute(model.name_or_path) if is_local(model.name_or_path) else model.name_or_path
    adapter = absolute(model.adapter) if model.adapter else None
    rewards = [r.model_copy(update={"function": _reward(r.function)}) for r in recipe.grpo.rewards]
    return recipe.model_copy(
        update={
            "model": model.model_copy(update={"name_or_path": name, "adapter": adapter}),
            "data": _data(recipe.data),
            "grpo": recipe.grpo.model_copy(update={"rewards": rewards}),
        }
    )


def _data(data: DataSection) -> DataSection:
    template = data.chat_template
    if template is not None and (template.endswith(".jinja") or "/" in template or template.startswith("~")):
        template = absolute(template)
    return data.model_copy(
        update={
            "train_path": absolute(data.train_path) if data.train_path else None,
            "eval_path": absolute(data.eval_path) if data.eval_path else None,
            "sources": [_source(s) for s in data.sources],
            "eval_sources": [_source(s) for s in data.eval_sources],
            "chat_template": template,
            "cache_dir": absolute(data.cache_dir),
        }
    )


def _source(source: SourceSection) -> SourceSection:
    if source.path is not None:
        return source.model_copy(update={"path": absolute(source.path)})
    if source.hub is not None and Path(source.hub).expanduser().exists():  # a local dataset folder
        return source.model_copy(update={"hub": absolute(source.hub)})
    return source


def _reward(function: str) -> str:
    if function in BUILTIN_REWARDS:
        return function
    target, _, name = function.rpartition(":")
    if target.endswith(".py"):
        return f"{absolute(target)}:{name}"
    module_file = Path(f"{target}.py")
    if "." not in target and module_file.is_file():  # the working directory's own module: its file
        return f"{absolute(str(module_file))}:{name}"
    return function
