"""User code the pipeline runs (a GRPO reward's module and function, a model's own code): sys.exit() or a
KeyboardInterrupt it raises, imported or called, ends the command in one line naming it, exit 2 (neither is
an Exception: the command ended with the code's own exit, 0, having done nothing). A real Ctrl-C stays an
interruption."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from qlora_pipe.runs import RunDir
from tests.conftest import recipe_dict
from tests.helpers.recipes import grpo_recipe

# A reward module whose behaviour a file beside it chooses: at import or when called, exit or interrupt.
SWITCHED = """
import os, signal, sys, time
from pathlib import Path

MODE = Path(__file__).with_name("mode.txt").read_text().strip()
if MODE == "import-exit":
    sys.exit()
if MODE == "import-interrupt":
    raise KeyboardInterrupt
if MODE == "import-ctrl-c":  # a real Ctrl-C while the module imports
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)


def scored(completions, **kwargs):
    if MODE == "call-exit":
        sys.exit(3)
    if MODE == "call-interrupt":
        raise KeyboardInterrupt
    return [float(len(c[0]["content"]) % 2) for c in completions]
"""


def switched_recipe(tiny_model_dir: Path, tmp_path: Path, name: str, function: str, held_out: bool = True) -> Path:
    raw = grpo_recipe(tiny_model_dir, tmp_path, name, rewards=[{"function": function}], max_steps=1)
    if not held_out:
        raw["data"]["eval_path"] = None
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(raw))
    return path


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_reward_module_that_exits_or_interrupts_at_import_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """validate, data and train: exit 2 and one line naming the module (file.py:function and module:function)."""
    from qlora_pipe.cli import main

    (tmp_path / "switched.py").write_text(SWITCHED)
    mode = tmp_path / "mode.txt"
    file_form = switched_recipe(tiny_model_dir, tmp_path, "file", f"{tmp_path / 'switched.py'}:scored")
    mode.write_text("import-exit")
    for command in (["validate"], ["data"], ["train"]):
        assert main([*command, str(file_form)]) == 2, command
        line = last_error(capsys)
        assert f"grpo.rewards.0.function: importing {tmp_path / 'switched.py'} called sys.exit()" in line
        assert "if __name__ == '__main__'" in line
    assert not (tmp_path / "runs" / "file").exists()  # train stopped before its run directory
    package = tmp_path / "rewardpkg"  # module:function, imported from the working directory as Python does
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "switched.py").write_text(SWITCHED)
    mode = package / "mode.txt"
    monkeypatch.chdir(tmp_path)
    module_form = switched_recipe(tiny_model_dir, tmp_path, "module", "rewardpkg.switched:scored")
    mode.write_text("import-interrupt")
    assert main(["validate", str(module_form)]) == 2
    assert "grpo.rewards.0.function: importing rewardpkg.switched raised KeyboardInterrupt" in last_error(capsys)
    mode.write_text("import-ctrl-c")
    # Python's own SIGINT handler, as a fresh CLI process has (an earlier test in this worker, or a library it
    # loaded, may have left another one in place)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["validate", str(module_form)]) == 130  # a real Ctrl-C is an interruption
    finally:
        signal.signal(signal.SIGINT, previous)
    assert last_error(capsys) == "interrupted"


def test_a_reward_that_exits_or_interrupts_when_called_is_one_line(tiny_model_dir, tmp_path, capsys):
    """train and eval: the reward, what it did and the prompt row in one line, exit 2; the run is marked failed."""
    from qlora_pipe.cli import main

    (tmp_path / "switched.py").write_text(SWITCHED)
    mode = tmp_path / "mode.txt"
    function = f"{tmp_path / 'switched.py'}:scored"
    mode.write_text("fine")
    trained = switched_recipe(tiny_model_dir, tmp_path, "trained", function)
    assert main(["train", str(trained)]) == 0
    mode.write_text("call-exit")
    assert main(["eval", str(tmp_path / "runs" / "trained")]) == 2
    line = last_error(capsys)
    assert f"reward scored ({function}) called sys.exit(3) on held-out prompt 1 ('..." in line
    mode.write_text("call-interrupt")
    assert main(["train", str(switched_recipe(tiny_model_dir, tmp_path, "stopped", function, False))]) == 2
    line = last_error(capsys)
    assert f"reward scored ({function}) raised KeyboardInterrupt on training prompt " in line
    assert RunDir(tmp_path / "runs" / "stopped").state() == "failed"


def test_model_code_that_exits_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A model's own code (auto_map, model.trust_remote_code: true) that calls sys.exit(0) when transformers
    imports it: exit 2 and one line naming the file, not exit 0."""
    from qlora_pipe.cli import main

    model = tmp_path / "model"
    model.mkdir()
    for item in tiny_model_dir.iterdir():
        (model / item.name).symlink_to(item)
    (model / "config.json").unlink()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_exit.ExitConfig"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_exit.py").write_text("import sys\n\nsys.exit(0)\n")
    raw = recipe_dict(model, tmp_path / "runs")
    raw["model"]["trust_remote_code"] = True
    recipe = tmp_path / "remote.yaml"
    recipe.write_text(json.dumps(raw))
    # transformers copies the model's code into its modules cache (in-process: its module-level folder)
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "modules"))
    assert main(["data", str(recipe), "--preview", "0"]) == 2
    line = last_error(capsys)
    assert line.startswith("error: data: the code at ") and "configuration_exit.py:3 called sys.exit(0)" in line
