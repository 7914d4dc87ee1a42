"""Reading a recipe: YAML (safe_load), --set overrides, validation, and one-line error messages."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from qlora_pipe.errors import UserError
from qlora_pipe.recipe.paths import resolve_paths
from qlora_pipe.recipe.schema import Recipe

INTERNAL_FIELDS = ("source", "overrides")  # set by loading, never written in a recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; raise UserError with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    text = path.read_text(encoding="utf-8")
    raw = parse_yaml(text, str(path))
    for item in overrides or []:
        apply_override(raw, item)
    recipe = resolve_paths(validate_recipe(raw, str(path)))  # relative to the working directory, made absolute
    return recipe.model_copy(update={"overrides": list(overrides or [])})


def parse_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "malformed YAML"
        raise UserError(f"{where}{pos}: invalid YAML: {problem}") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: invalid YAML: {exc}") from exc
    if raw is None:
        raise UserError(f"{where}: the recipe is empty")
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override; the value is parsed as YAML (safe_load)."""
    key, sep, value_text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. training.learning_rate=1e-4")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(f"--set {item!r}: value is not valid YAML") from exc
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            dotted = ".".join(parts[: depth + 1])
            raise UserError(f"--set {item!r}: {dotted} is a value, not a section")
        node = child
    node[parts[-1]] = value


def validate_recipe(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{where}: {describe_validation_error(exc)}") from exc
    return recipe.model_copy(update={"source": where})


def describe_validation_error(exc: ValidationError) -> str:
    """Turn pydantic's first error into one line naming the dotted path and the offending value."""
    messages = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal["))]
        # Union branches add a type tag (e.g. "list[str]") to the location; drop it.
        loc = [p for p in loc if not p.startswith(("list[", "str", "int", "float"))] or loc
        dotted = ".".join(loc)
        if err["type"] == "extra_forbidden":
            messages.append(_unknown_key_message(loc))
        elif err["type"] == "missing":
            messages.append(f"{dotted}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            got = "" if isinstance(value, dict) else f" (got {value!r})"
            messages.append(f"{dotted or 'recipe'}: {msg}{got}")
    # One line: the first problem, and how many more there are.
    extra = f" (and {len(messages) - 1} more problem(s))" if len(messages) > 1 else ""
    return messages[0] + extra


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The recipe section class behind an annotation: X, list[X] or X | None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = section_type(arg)
        if found is not None:
            return found
    return None


def _unknown_key_message(loc: list[str]) -> str:
    dotted = ".".join(loc)
    section: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if part.isdigit():  # an index into a list of sections
            continue
        field = section.model_fields.get(part)
        inner = section_type(field.annotation) if field else None
        if inner is None:
            break
        section = inner
    valid = [name for name in section.model_fields if name not in INTERNAL_FIELDS]
    close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
    hint = f"did you mean '{'.'.join([*loc[:-1], close[0]])}'?" if close else f"valid keys: {', '.join(valid)}"
    return f"{dotted}: unknown key ({hint})"
