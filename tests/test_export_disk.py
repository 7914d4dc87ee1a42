"""A disk that fills while the merged model is written: one line naming the folder and the cause, exit 2, and
nothing half-written kept (the merge streams tensor by tensor, so the disk can fill at any shard)."""

from __future__ import annotations

import yaml

from qlora_pipe.recipe import validate_recipe
from qlora_pipe.training.stage import run_training
from tests.conftest import recipe_dict
from tests.helpers.mounts import cli_in, one_error


def test_a_full_disk_while_merging_is_one_line_and_keeps_nothing(tiny_model_dir, tmp_path, own_mounts):
    """The merged tiny model is about 0.9 MB; the export's folder is a 256 KiB file system, which fills midway."""
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs", max_steps=1, report_to=["none"])
    run = run_training(validate_recipe(raw)).run_dir.root
    small = tmp_path / "small"
    code, stderr, left = cli_in(
        own_mounts, "size=256k", small, "export", str(run), "--no-verify", "--out", str(small / "merged")
    )
    line = one_error(stderr)
    assert code == 2, stderr
    assert f"export: cannot write the merged model into {small} (no space left on the device" in line, line
    assert not [p for p in left if p.startswith("merged")], left  # neither merged/ nor merged.partial/
    assert (run / "adapter_model.safetensors").is_file() and not (run / "merged").exists()
    assert yaml.safe_load((run / "recipe.resolved.yaml").read_text())  # the run itself untouched
