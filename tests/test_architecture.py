"""The package's shape: stages as subpackages, no import cycles, small modules, light imports, and every
reach into a library's internals inside compat/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qlora_pipe"
STAGES = ("recipe", "data", "training", "plan", "export", "publish", "evaluate")
# Modules that implement a command for the CLI: other stages must not reach into them.
COMMAND_MODULES = {
    "qlora_pipe.export.command",
    "qlora_pipe.evaluate.evaluation",
    "qlora_pipe.evaluate.chat",
    "qlora_pipe.plan.report",
    "qlora_pipe.data.preview",
}
# What only compat/ may touch: private Trainer hooks and library internals.
INTERNALS = (
    "_load_from_checkpoint",
    "_save_checkpoint",
    "get_keys_to_not_convert",
    "Params4bit",
    "support_avx512bf16_for_cpu",
    "remove_callback",
    "logging_dir",
    "chat_template_utils",
    "_foreach_norm",
    "_get_dtype_plan",
    "suppress_seqcls_warning",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """qlora_pipe modules a file imports anywhere: at the top, inside functions, and under TYPE_CHECKING."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module and node.module.startswith("qlora_pipe"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in known else node.module)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names if a.name.startswith("qlora_pipe"))

    Visitor().visit(ast.parse(path.read_text()))
    return {m for m in found if m in known} - {module_name(path)}


# The layers, lowest first. A module imports from its own layer and the layers below, never from above: each
# stage is a layer of its own, so a stage reaches another only downwards. The method modules compose the stages
# and sit above them; the stages know only Method and method_for (methods/__init__.py finds a method by name).
KERNEL = ("errors", "lazy", "sizes", "finite", "terminal", "runs")
LAYERS = (
    tuple(f"qlora_pipe.{name}" for name in KERNEL),
    ("qlora_pipe.compat",),
    ("qlora_pipe.recipe",),
    ("qlora_pipe.machine",),
    ("qlora_pipe.rewards",),
    ("qlora_pipe.data", "qlora_pipe.vision"),  # a vision row's reading, checks, encoding and batches
    ("qlora_pipe.models", "qlora_pipe.vision.model", "qlora_pipe.vision.builder"),
    ("qlora_pipe.methods", "qlora_pipe.methods.base"),
    ("qlora_pipe.plan",),
    ("qlora_pipe.evaluate", "qlora_pipe.vision.answers"),
    ("qlora_pipe.training",),
    ("qlora_pipe.export",),
    ("qlora_pipe.publish",),
    ("qlora_pipe.methods.",),
    ("qlora_pipe.quickstart", "qlora_pipe.wheelhouse"),
    ("qlora_pipe.cli", "qlora_pipe"),
)


def layer_of(module: str) -> int:
    """The layer of a module: the longest member of LAYERS that names it (a member ending in "." names the
    modules under that package, not the package itself)."""
    matches = [
        (len(member), number)
        for number, members in enumerate(LAYERS)
        for member in members
        if module == member or module.startswith(member if member.endswith(".") else member + ".")
    ]
    assert matches, f"{module} is in no layer of tests/test_architecture.py's LAYERS"
    return max(matches)[1]


def test_every_import_goes_down_the_layers():
    known = modules()
    up = [
        f"{name} -> {target}"
        for name, path in sorted(known.items())
        for target in sorted(imported(path, known))
        if layer_of(target) > layer_of(name)
    ]
    assert not up, "imports up the layers: " + "; ".join(up)


def test_at_most_six_loose_modules():
    loose = sorted(p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert loose == sorted(KERNEL), f"modules beside the packages: {loose} (a module belongs in its package)"


def test_every_stage_is_a_subpackage_that_states_its_api():
    for stage in STAGES:
        init = PACKAGE / stage / "__init__.py"
        assert init.is_file(), stage
        assert ast.get_docstring(ast.parse(init.read_text())), f"{stage}/__init__.py states no API"


def test_no_import_cycles():  # every import counted, as in the layer test
    known = modules()
    graph = {name: imported(path, known) for name, path in known.items()}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_stage_reaches_into_another_stages_command():
    known = modules()
    for name, path in known.items():
        if name.startswith("qlora_pipe.cli"):  # the CLI calls every command
            continue
        if name.startswith("qlora_pipe.methods."):  # a method answers for each command (the data preview, ...)
            continue
        for target in imported(path, known) & COMMAND_MODULES:
            assert target.split(".")[1] == name.split(".")[1], f"{name} imports the command module {target}"


def test_modules_are_small():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 300}
    assert not long, f"modules over 300 lines: {long}"


def test_library_internals_only_in_compat():
    for name, path in modules().items():
        if name.startswith("qlora_pipe.compat"):
            continue
        text = path.read_text()
        used = [word for word in INTERNALS if word in text]
        assert not used, f"{name} reaches into {used}: that belongs in qlora_pipe/compat/"


def test_compat_modules_name_their_verified_versions():
    for path in (PACKAGE / "compat").glob("*.py"):
        if path.name == "__init__.py":
            continue
        text = path.read_text()
        assert "Verified with" in text and "VERIFIED = {" in text and "Caught by:" in text, path.name


def test_validating_a_recipe_does_not_import_torch():
    code = (
        "import sys, qlora_pipe.recipe, qlora_pipe.cli, qlora_pipe.cli.commands, qlora_pipe.data, "
        "qlora_pipe.training, qlora_pipe.plan; "
        "qlora_pipe.recipe.load_recipe('recipes/qa-legal.yaml'); "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'trl') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# Branches on the method's (or task's) name left outside qlora_pipe/methods/ (57 before methods/ existed). The
# count may only fall: a new branch belongs in the method's module (issue 38: none at all outside methods/).
METHOD_BRANCHES_LEFT = 0


def test_branches_on_the_method_name_stay_in_methods():
    import re

    branch = re.compile(r"\.(method|task) (==|!=|in|not in) ")
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if "methods" not in path.relative_to(PACKAGE).parts[:1]
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert len(found) <= METHOD_BRANCHES_LEFT, "a new branch on the method name outside methods/: " + ", ".join(found)


def test_stages_after_training_read_the_settled_settings():
    """Precision and the compute dtype are settled once, when training starts (training/compute.py), and recorded
    in the run's recipe (models/base_record.py's run_recipe refuses one left at auto); export, evaluate and
    publish read them and never resolve them again."""
    for stage in ("export", "evaluate", "publish"):
        for path in sorted((PACKAGE / stage).rglob("*.py")):
            text = path.read_text()
            assert "resolved_precision" not in text and "resolve_recipe_precision" not in text, path


def test_test_files_share_code_only_through_tests_helpers():
    """Shared test code lives in tests/helpers/ (and the fixtures in conftest.py); no test file imports another."""
    tests = PACKAGE.parent / "tests"
    loose = sorted(p.name for p in tests.glob("*.py") if not p.name.startswith("test_") and p.name != "conftest.py")
    assert not loose, f"shared test code outside tests/helpers/: {loose}"
    for path in sorted(tests.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests.test_"):
                raise AssertionError(f"{path.name} imports {node.module}: move what they share into tests/helpers/")
