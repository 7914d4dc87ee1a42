"""`export --format gguf` after `export` converts the verified merged folder as it is: no second merge or
verification, unless the adapter, the settings or a file of the folder changed since."""

from __future__ import annotations

import json

from qlora_pipe.cli import main


def test_a_verified_merged_folder_is_reused_for_the_gguf_unless_something_changed(make_recipe, converter, capsys):
    from qlora_pipe.training.stage import run_training

    run = run_training(make_recipe(max_steps=2)).run_dir.root
    merged = run / "merged"
    assert main(["export", str(run)]) == 0
    info = json.loads((merged / "export_info.json").read_text())
    weights = merged / "model.safetensors"
    assert info["files"]["model.safetensors"]["bytes"] == weights.stat().st_size and len(info["adapter_sha256"]) == 64
    before = weights.stat()
    capsys.readouterr()

    assert main(["export", str(run), "--format", "gguf", "--gguf-type", "f16"]) == 0
    out = capsys.readouterr().out
    assert f"merged: {merged} reused (verified, same adapter and settings, every file unchanged)" in out
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not written again
    fidelity = json.loads((merged / "fidelity.json").read_text())
    assert fidelity["passed"] and fidelity["gguf"]["f16"]["passed"]

    # Other settings: merged again, as asked.
    assert main(["export", str(run), "--format", "gguf", "--gguf-type", "f16", "--dtype", "float32"]) == 0
    assert (
        "merged: made again" in (out := capsys.readouterr().out) and "it was merged with dequantized / bfloat16" in out
    )
    # A file edited after the export (here a config): never reused.
    config = merged / "config.json"
    config.write_text(config.read_text().replace("{", "{\n", 1))
    assert main(["export", str(run), "--format", "gguf", "--gguf-type", "f16", "--dtype", "float32"]) == 0
    assert (
        "merged: made again" in (out := capsys.readouterr().out) and "config.json changed since it was written" in out
    )
    assert not config.read_text().startswith("{\n\n")  # the folder was written anew
