"""The recipe stage: a typed, validated description of one fine-tuning run. Importing it never imports torch.

load_recipe(path, overrides)  read, override (--set) and validate a recipe file
validate_recipe(raw, where)   validate a mapping
resolve_paths(recipe)         its local paths made absolute (load_recipe does it; training records them so)
Recipe and its sections       the typed object every stage receives
reference.explain()           every key with its default and meaning (validate --explain)
"""

from qlora_pipe.recipe.loading import load_recipe, section_type, validate_recipe
from qlora_pipe.recipe.paths import resolve_paths
from qlora_pipe.recipe.schema import DataSection, Recipe, SourceSection

__all__ = ["DataSection", "Recipe", "SourceSection", "load_recipe", "resolve_paths", "section_type", "validate_recipe"]
