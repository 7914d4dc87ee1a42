"""A GGUF file or a local folder as the base: converted once per file content, recorded when a run starts and
checked by every stage after it; the cache's incomplete entries, read-only folders and full disks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from qlora_pipe.cli import main
from qlora_pipe.machine.user_cache import RACY_NS
from qlora_pipe.models.gguf_source import base_folder, base_source, source_of
from qlora_pipe.recipe import validate_recipe
from qlora_pipe.runs import RunDir, file_sha256
from qlora_pipe.training.stage import run_training
from tests.conftest import recipe_dict
from tests.helpers.crashes import CrashAtStep, SimulatedCrash
from tests.helpers.mounts import cli_in, one_error

REPO = Path(__file__).resolve().parents[1]
Q = "model.layers.0.self_attn.q_proj.weight"
CONVERTS = "into a plain bf16 folder"  # the log line of a conversion
CONVERT = (  # another process: ready once its imports are done, then converting when told to go
    "import logging, sys; from pathlib import Path; logging.basicConfig(level=logging.INFO); "
    "import transformers; from qlora_pipe.models.gguf_source import base_folder; print('ready', flush=True); "
    "sys.stdin.readline(); print(base_folder(Path(sys.argv[1])))"
)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private XDG_CACHE_HOME: converted bases and file hashes of this test only."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def replace_keeping_size_and_mtime(path: Path) -> None:
    """Another model of the same size under the same name, with the old modification time (touch -r): one
    tensor's weights negated in place."""
    from gguf import GGUFReader

    before = path.stat()
    reader = GGUFReader(str(path), "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    tensor.data[...] = -tensor.data
    reader.data.flush()
    del reader, tensor
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_gguf_replaced_with_its_size_and_mtime_kept_is_converted_again(tiny_gguf, cache, tmp_path):
    gguf = tmp_path / "base.gguf"
    shutil.copy(tiny_gguf, gguf)
    time.sleep(RACY_NS / 1e9 + 0.2)  # old enough for its hash to be kept (user_cache: the racy rule)
    first = base_folder(gguf)
    assert source_of(first)["sha256"] == file_sha256(gguf)
    replace_keeping_size_and_mtime(gguf)
    second = base_folder(gguf)
    assert second != first and source_of(second)["sha256"] == file_sha256(gguf)
    assert torch.equal(load_file(second / "model.safetensors")[Q], -load_file(first / "model.safetensors")[Q])
    assert list((cache / "qlora-pipe/hashes").glob("*.json"))  # the first hash had been kept: the case at stake


def test_every_stage_after_training_refuses_a_replaced_gguf_base(tiny_gguf, cache, tmp_path, capsys):
    gguf = tmp_path / "base.gguf"
    shutil.copy(tiny_gguf, gguf)
    original = gguf.read_bytes()
    raw = recipe_dict(gguf, tmp_path / "runs", max_steps=2, save_steps=1, report_to=["none"])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    recipe = validate_recipe(raw)
    with pytest.raises(SimulatedCrash):
        run_training(recipe, callbacks=(CrashAtStep(2),))
    run = RunDir(recipe.run_dir())

    replace_keeping_size_and_mtime(gguf)
    assert main(["train", str(tmp_path / "recipe.yaml"), "--resume"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: cannot resume {run.root}: the base model changed") and str(gguf) in line

    gguf.write_bytes(original)  # the file the run trained on, back: it resumes and finishes
    summary = run_training(recipe, resume=True).summary
    assert summary["base_source"]["sha256"] == file_sha256(gguf)

    replace_keeping_size_and_mtime(gguf)
    root = str(run.root)
    for command in (
        ["export", root],
        ["export", root, "--unmerged"],
        ["eval", root, "--limit", "1"],
        ["chat", root, "--prompt", "What is a tort?"],
        ["push", root, "--repo-id", "me/tiny", "--dry-run"],
    ):
        assert main(command) == 2, command
        line = error_line(capsys)
        assert f"the base model changed since the run trained on it: the GGUF file {gguf.resolve()}" in line, line
    assert sorted(p.name for p in run.root.iterdir() if "merged" in p.name or "unmerged" in p.name) == []


def test_stages_after_training_refuse_a_changed_base_folder(tiny_model_dir, cache, tmp_path, capsys):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    raw = recipe_dict(base, tmp_path / "runs", max_steps=1, report_to=["none"])
    run = run_training(validate_recipe(raw)).run_dir
    size = (base / "model.safetensors").stat().st_size
    weights = load_file(base / "model.safetensors")
    weights[Q] = -weights[Q]  # another model of the same size and shapes
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    assert (base / "model.safetensors").stat().st_size == size
    assert main(["export", str(run.root), "--no-verify"]) == 2
    line = error_line(capsys)
    assert f"the base model changed since the run trained on it: {base.resolve()}/model.safetensors changed" in line
    assert set(json.loads(run.base_record.read_text())["files"]) == {"config.json", "model.safetensors"}
    raw.update(run_name="continued", model={"name_or_path": str(base), "adapter": str(run.root)})
    (tmp_path / "continued.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "continued.yaml")]) == 2  # model.adapter: trained on other weights
    assert error_line(capsys).startswith(f"error: model.adapter: {run.root}: the base model changed since")


def test_a_hub_base_records_its_commit_and_later_stages_load_that_commit(tiny_model_dir, tmp_path, monkeypatch):
    """The Hub cache as huggingface_hub lays it out (offline): refs/main names the snapshot loaded."""
    from huggingface_hub import constants

    from qlora_pipe.errors import UserError
    from qlora_pipe.machine.hardware import resolve_recipe_precision
    from qlora_pipe.models.base_record import check_same_base, record_base, run_recipe

    hub, first, second = tmp_path / "hub", "a" * 40, "b" * 40
    repo = hub / "models--me--tiny"
    for commit in (first, second):
        shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(first)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    recipe = validate_recipe(recipe_dict("me/tiny", tmp_path / "runs"))
    run = RunDir(tmp_path / "runs/test")
    run.root.mkdir(parents=True)
    run.resolved_recipe.write_text(recipe.dump_yaml())  # precision auto: not what training records
    with pytest.raises(UserError, match=r"leaves training\.precision, quantization\.compute_dtype at auto; training"):
        run_recipe(run, "export")
    recipe = resolve_recipe_precision(recipe)[0]  # settled once, as training does, and read by every later stage
    run.resolved_recipe.write_text(recipe.dump_yaml())
    assert record_base(run, recipe)["commit"] == first
    (repo / "refs/main").write_text(second)  # the branch moved on since the run trained
    with pytest.raises(UserError, match="me/tiny at main is now commit bbbbbbbbbbbb, not aaaaaaaaaaaa"):
        check_same_base(run, recipe, "cannot resume")
    assert run_recipe(run, "export").model.revision == first  # export, eval, chat: the commit it trained on


def test_an_incomplete_cache_entry_is_replaced_once_under_a_lock(tiny_gguf, cache, tmp_path, caplog):
    folder = base_folder(tiny_gguf)
    (folder / "source.json").unlink()  # written last: without it the entry is incomplete
    recipe = validate_recipe(recipe_dict(tiny_gguf, tmp_path / "runs"))
    assert base_source(recipe)["sha256"] == file_sha256(tiny_gguf)  # a run records its source all the same
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    other = subprocess.Popen(
        [sys.executable, "-c", CONVERT, str(tiny_gguf)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert other.stdout.readline().strip() == "ready"
    other.stdin.write("go\n")
    other.stdin.flush()
    with caplog.at_level(logging.INFO, logger="qlora_pipe.models.gguf_source"):
        assert base_folder(tiny_gguf) == folder  # this process and the other one at the same time
        out, err = other.communicate(timeout=300)
        assert other.returncode == 0 and out.strip() == str(folder), err
        assert (CONVERTS in caplog.text) + (CONVERTS in err) == 1, err  # one replaced it, the other used it
        caplog.clear()
        assert base_folder(tiny_gguf) == folder and CONVERTS not in caplog.text  # complete now: used as it is
    assert source_of(folder)["sha256"] == file_sha256(tiny_gguf)
    assert sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) == [folder.name]  # no staging left


NAMES = ("qlora-pipe", "gguf-bases")


def gguf_recipe(gguf: Path, tmp_path: Path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(gguf, tmp_path / "runs", max_steps=1, report_to=["none"])))
    return recipe


def test_a_cache_folder_that_is_a_file_is_one_line(tiny_gguf, tmp_path, monkeypatch, capsys):
    """Where a folder of the cache should be there is a file (mkdir: ENOTDIR): as root, chmod would not stop
    the writes, so this is the unwritable cache every user, root included, can meet."""
    (tmp_path / "blocker").write_text("a file, not a folder\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocker" / "cache"))
    assert main(["train", str(gguf_recipe(tiny_gguf, tmp_path))]) == 2
    line = error_line(capsys)
    assert f"cannot write the cache folder {tmp_path}/blocker/cache/qlora-pipe/gguf-bases" in line, line
    assert "(a path above it is a file, not a folder)" in line and "XDG_CACHE_HOME" in line, line
    assert main(["get-model", "smollm2-135m-instruct"]) == 2
    line = error_line(capsys)
    assert f"get-model smollm2-135m-instruct: cannot write the cache folder {tmp_path}/blocker/cache" in line, line
    assert not (tmp_path / "runs" / "test").exists()  # no run started
    assert main(["setup-gguf"]) == 2  # refused before its download
    assert f"setup-gguf: cannot write the cache folder {tmp_path}/blocker/cache/qlora-pipe " in error_line(capsys)


@pytest.mark.parametrize("command", ["train", "get-model"])
def test_a_read_only_cache_is_one_line(tiny_gguf, tmp_path, own_mounts, command):
    args = ["train", str(gguf_recipe(tiny_gguf, tmp_path))] if command == "train" else ["get-model", "gemma3-270m"]
    code, stderr, _ = cli_in(own_mounts, "ro", tmp_path / "cache", *args)
    line = one_error(stderr)
    assert code == 2 and "cannot write the cache folder" in line and "(read-only file system)" in line, stderr
    assert str(tmp_path / "cache" / "qlora-pipe") in line, line


def test_a_full_disk_while_converting_is_one_line_and_leaves_nothing_half_written(tiny_gguf, tmp_path, own_mounts):
    """The cache's file system has room for the configs, not for the weights (0.86 MB): the write fails midway."""
    code, stderr, left = cli_in(
        own_mounts, "size=256k", tmp_path / "cache", "train", str(gguf_recipe(tiny_gguf, tmp_path))
    )
    line = one_error(stderr)
    assert code == 2 and "no space left on the device" in line and "tiny-f16.gguf" in line, stderr
    assert str(tmp_path / "cache/qlora-pipe/gguf-bases") in line, line
    # What it created and may keep: the cache's folders, the conversion's lock, a whole file's hash; no staging
    assert "qlora-pipe/gguf-bases" in left, left
    assert all(p.startswith("qlora-pipe/hashes") or p.endswith(".lock") or Path(p).name in NAMES for p in left)
