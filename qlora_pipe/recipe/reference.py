"""The recipe reference: every field with its default and meaning (``validate --explain``, docs/recipe.md)."""

from __future__ import annotations

from typing import get_origin

from pydantic import BaseModel

from qlora_pipe.recipe.loading import INTERNAL_FIELDS, section_type
from qlora_pipe.recipe.schema import Recipe


def iter_fields(model: type[BaseModel] = Recipe, prefix: str = ""):
    """(dotted name, field) for every leaf field of the recipe; list sections appear as ``name[].key``."""
    for name, field in model.model_fields.items():
        if name in INTERNAL_FIELDS:
            continue
        inner = section_type(field.annotation)
        if inner is not None:
            suffix = "[]." if get_origin(field.annotation) is list else "."
            if suffix == "[].":
                yield f"{prefix}{name}", field
            yield from iter_fields(inner, f"{prefix}{name}{suffix}")
        else:
            yield f"{prefix}{name}", field


def explain() -> str:
    """Every recipe field with its default and one-line description."""
    lines = []
    for dotted, field in iter_fields():
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        lines.append(f"{dotted} = {default}\n    {field.description}")
    return "\n".join(lines)


def explain_markdown() -> str:
    """The recipe reference as a markdown table (docs/recipe.md embeds it)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for dotted, field in iter_fields():
        default = "*required*" if field.is_required() else f"`{field.get_default(call_default_factory=True)!r}`"
        rows.append(f"| `{dotted}` | {default} | {field.description} |")
    return "\n".join(rows) + "\n"
