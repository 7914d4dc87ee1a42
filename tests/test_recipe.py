"""Recipe schema: every bundled recipe validates; every kind of bad input gets a one-line error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import Recipe, load_recipe
from qlora_pipe.recipe.reference import explain

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


MINIMAL = "model:\n  name_or_path: some/model\ndata:\n  train_path: data/legal-qa/train.jsonl\n"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_bundled_recipes_validate(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.quantization.enabled and recipe.quantization.quant_type == "nf4"


def test_defaults_follow_qlora_practice(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.quantization.double_quant is True
    assert recipe.quantization.compute_dtype == "auto"  # resolved per machine at run time (machine/hardware.py)
    assert recipe.training.optimizer == "paged_adamw_8bit"
    assert recipe.training.precision == "auto"
    assert recipe.training.lr_scheduler == "cosine"
    assert recipe.training.gradient_checkpointing is True
    assert recipe.data.loss_on == "assistant"


def test_misspelt_key_names_path_and_closest_key(tmp_path):
    path = write(tmp_path, MINIMAL + "training:\n  learnig_rate: 1.0e-4\n")
    with pytest.raises(
        UserError, match=r"training\.learnig_rate: unknown key \(did you mean 'training\.learning_rate'"
    ):
        load_recipe(path)


def test_unknown_section(tmp_path):
    with pytest.raises(UserError, match=r"lorra: unknown key \(did you mean 'lora'"):
        load_recipe(write(tmp_path, MINIMAL + "lorra:\n  r: 8\n"))


@pytest.mark.parametrize(
    ("snippet", "pattern"),
    [
        ("training:\n  learning_rate: -1\n", r"training\.learning_rate: .*greater than 0 \(got -1\)"),
        ("lora:\n  r: lots\n", r"lora\.r: .*integer.*\(got 'lots'\)"),
        ("lora:\n  dropout: 1.5\n", r"lora\.dropout: .*less than 1 \(got 1\.5\)"),
        ("quantization:\n  quant_type: int3\n", r"quantization\.quant_type: .*'nf4' or 'fp4' \(got 'int3'\)"),
        ("lora:\n  target_modules: []\n", r"lora\.target_modules: must be a non-empty list"),
        ("lora:\n  target_modules: q_proj\n", r"lora\.target_modules: must be a non-empty list"),
    ],
)
def test_wrong_type_or_range_names_path_and_value(tmp_path, snippet, pattern):
    with pytest.raises(UserError, match=pattern):
        load_recipe(write(tmp_path, MINIMAL + snippet))


def test_missing_required_key(tmp_path):
    with pytest.raises(UserError, match=r"data: required key is missing"):
        load_recipe(write(tmp_path, "model:\n  name_or_path: x\n"))


def test_malformed_yaml_gives_line_and_column(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: x\ndata: [1,\n  train_path: y\n")
    with pytest.raises(UserError, match=r"recipe\.yaml:\d+:\d+: invalid YAML"):
        load_recipe(path)


def test_yaml_tags_are_not_executed(tmp_path):
    path = write(tmp_path, MINIMAL + "seed: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_recipe(path)


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, overrides=["training.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]"])
    assert recipe.training.learning_rate == 1e-4
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match=r"training\.learning_rat: unknown key"):
        load_recipe(path, overrides=["training.learning_rat=1e-4"])
    with pytest.raises(UserError, match=r"lora\.r: .*greater than or equal to 1 \(got 0\)"):
        load_recipe(path, overrides=["lora.r=0"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_recipe(path, overrides=["training.learning_rate"])


def float_keys(model: type, prefix: str = "") -> list[str]:
    """Every float key of the recipe (dotted), read from the schema itself so a new key is covered."""
    from typing import get_args

    from qlora_pipe.recipe.base import Section

    keys = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, Section):
            keys += float_keys(kind, f"{prefix}{name}.")
        elif kind is float or float in get_args(kind):
            keys.append(prefix + name)
    return keys


def test_every_float_key_refuses_non_finite_values(tmp_path):
    """inf, 1e400 (read as inf) and nan pass a bound like gt=0 unless refused; every float key refuses them
    in one line naming the key, from the file and from --set alike."""
    import inspect

    from pydantic import BaseModel

    import qlora_pipe.recipe.schema
    from qlora_pipe.recipe.base import Section

    keys = float_keys(Recipe)
    assert {"preference.beta", "training.learning_rate", "lora.alpha", "data.eval_fraction"} <= set(keys)
    path = write(tmp_path, MINIMAL)
    for key in keys:
        for value in (".inf", "1e400", "-.inf", ".nan"):
            with pytest.raises(UserError, match=re.escape(key) + ": .*finite number"):
                load_recipe(path, overrides=[f"{key}={value}"])
    file = write(tmp_path, MINIMAL + "preference:\n  beta: 1e400\n")
    with pytest.raises(UserError, match=r"preference\.beta: Input should be a finite number \(got '1e400'\)$"):
        load_recipe(file)
    # Sections inside lists (data.sources, ...) are covered by the same base class.
    modules = [m for n, m in vars(qlora_pipe.recipe).items() if inspect.ismodule(m)] + [qlora_pipe.recipe.schema]
    models = {
        c
        for m in modules
        for c in vars(m).values()
        if isinstance(c, type) and issubclass(c, BaseModel) and c.__module__.startswith("qlora_pipe.recipe")
    }
    assert models and all(issubclass(c, Section) for c in models), models


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    again = Recipe.model_validate(yaml.safe_load(recipe.dump_yaml()))
    assert again == recipe.model_copy(update={"source": None})


def test_explain_describes_every_field():
    text = explain()
    for section in ("model", "quantization", "lora", "data", "training", "export", "hub"):
        fields = Recipe.model_fields[section].annotation.model_fields
        for name, field in fields.items():
            assert f"{section}.{name} =" in text
            assert field.description, f"{section}.{name} has no description"


def test_readme_recipe_reference_is_current():
    from qlora_pipe.recipe.reference import explain_markdown

    assert explain_markdown() in (REPO / "docs" / "recipe.md").read_text(), (
        "docs/recipe.md's recipe reference is stale: run python scripts/update_readme_reference.py"
    )


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlora_pipe.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_validate_command_ok_and_errors(tmp_path):
    ok = run_cli("validate", "recipes/qa-legal.yaml")
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = run_cli("validate", str(write(tmp_path, MINIMAL + "training:\n  learnig_rate: 1\n")))
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0, bad.stderr  # one line, no traceback
    assert "did you mean 'training.learning_rate'" in bad.stderr
    missing = run_cli("validate", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 2 and "recipe file not found" in missing.stderr
    debug = run_cli("--debug", "validate", str(tmp_path / "missing.yaml"))
    assert "Traceback" in debug.stderr
