"""Every bad input a command can meet ends in one line naming what is wrong, exit code 2, no traceback.

A corrupted copy of each supported input is fed to the command that reads it: data files of every
format (not UTF-8, truncated, corrupt) to `qlora-pipe data`, broken base models (config, truncated
weights, pickle-only weights, a config asking for remote code) to `qlora-pipe train`, a run without its
adapter to `chat` and `eval`, and an adapter that does not fit its base to `export`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import TRAIN, recipe_dict
from tests.helpers.cli import assert_one_line_error, cli
from tests.helpers.damage import truncate
from tests.helpers.data import numbered, write_csv, write_jsonl, write_parquet


def write_recipe(tmp_path: Path, model_dir: Path, **data) -> Path:
    raw = recipe_dict(model_dir, tmp_path / "runs", max_steps=1)
    raw["data"].update(data)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def rows() -> list[dict]:
    return numbered("A", 6)


def flat_rows() -> list[dict]:
    return [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(6)]


def not_utf8(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"\xff\xfe broken \xc3\x28\n" + b"".join(lines[1:]))


def make_file(tmp_path: Path, kind: str) -> Path:
    if kind == "jsonl":
        return Path(write_jsonl(tmp_path / "train.jsonl", rows()))
    if kind == "json":
        path = tmp_path / "train.json"
        path.write_text(json.dumps(rows(), indent=1))
        return path
    if kind == "csv":
        return Path(write_csv(tmp_path / "train.csv", flat_rows(), ["question", "answer"]))
    return Path(write_parquet(tmp_path / "train.parquet", rows()))


DATA_CASES = [
    ("jsonl", not_utf8, ["train.jsonl:2: not UTF-8 text"]),
    ("json", not_utf8, ["train.json:2: not UTF-8 text"]),
    ("csv", not_utf8, ["train.csv:2: not UTF-8 text"]),
    ("jsonl", truncate, ["train.jsonl:", "invalid JSON"]),
    ("json", truncate, ["train.json:", "invalid JSON"]),
    ("parquet", truncate, ["train.parquet: cannot read this .parquet file"]),
    ("parquet", lambda p: p.write_bytes(b"PAR1" + os.urandom(300) + b"PAR1"), ["train.parquet: cannot read"]),
]


@pytest.mark.parametrize(
    ("kind", "damage", "expected"), DATA_CASES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(DATA_CASES)]
)
def test_corrupt_data_files(tiny_model_dir, tmp_path, kind, damage, expected):
    path = make_file(tmp_path, kind)
    damage(path)
    recipe = write_recipe(tmp_path, tiny_model_dir, train_path=str(path), eval_path=None)
    assert_one_line_error(cli("data", str(recipe)), *expected)


def broken_model(tiny_model_dir: Path, tmp_path: Path, damage) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(model)
    return model


def pickle_only(model: Path) -> None:
    import torch
    from safetensors.torch import load_file

    weights = model / "model.safetensors"
    torch.save(load_file(str(weights)), model / "pytorch_model.bin")
    weights.unlink()


def remote_code(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))


MODEL_CASES = [
    (lambda m: (m / "config.json").write_text("{not json"), ["config.json", "not valid JSON"]),
    (lambda m: truncate(m / "model.safetensors"), ["model.safetensors", "cannot load"]),
    (pickle_only, ["pytorch_model.bin", "pickle", "refused"]),
    (remote_code, ["asks to run its own code", "model.trust_remote_code"]),
]


@pytest.mark.parametrize(("damage", "expected"), MODEL_CASES, ids=["config", "truncated", "pickle", "remote-code"])
def test_broken_base_models(tiny_model_dir, tmp_path, damage, expected):
    model = broken_model(tiny_model_dir, tmp_path, damage)
    recipe = write_recipe(tmp_path, model, train_path=str(TRAIN))
    assert_one_line_error(cli("train", str(recipe)), *expected)
    assert not (tmp_path / "runs" / "test" / "summary.json").exists()


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad-inputs-run")
    raw = recipe_dict(tiny_model_dir, folder / "runs", max_steps=1, report_to=["none"])
    (folder / "recipe.yaml").write_text(yaml.safe_dump(raw))
    done = cli("train", str(folder / "recipe.yaml"))
    assert done.returncode == 0, done.stderr[-2000:]
    return folder / "runs" / "test"


def test_run_without_its_adapter(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "adapter_model.safetensors").unlink()
    for command in (["chat", str(run), "--prompt", "hi"], ["eval", str(run)], ["export", str(run)]):
        assert_one_line_error(cli(*command), "adapter")


def test_adapter_that_does_not_fit_its_base(finished, tmp_path):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    weights = load_file(str(run / "adapter_model.safetensors"))
    cut = {k: v[:, :-1].contiguous() if v.dim() == 2 else v for k, v in weights.items()}
    save_file(cut, str(run / "adapter_model.safetensors"))
    for command in (["chat", str(run), "--prompt", "hi"], ["export", str(run)]):
        assert_one_line_error(cli(*command), "adapter")
