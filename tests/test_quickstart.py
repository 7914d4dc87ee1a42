"""The offline quickstart, end to end through the CLI, with fewer steps than the README run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_end_to_end(tmp_path):
    base = tmp_path / "quickstart-base"
    build = subprocess.run(
        [sys.executable, "scripts/build_quickstart_model.py", "--out", str(base), "--steps", "60"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    info = json.loads((base / "quickstart_build.json").read_text())
    assert info["final_loss"] < info["first_loss"]  # the base really was pretrained

    overrides = [
        f"model.name_or_path={base}",
        f"output_dir={tmp_path / 'runs'}",
        "training.max_steps=16",
        "training.eval_steps=8",
        "training.preview_max_new_tokens=16",
    ]
    args = [sys.executable, "scripts/train.py", "recipes/quickstart.yaml"]
    for item in overrides:
        args += ["--set", item]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "runs as adamw_8bit" in result.stderr  # the paged optimizer's CPU fallback is announced once
    assert "answers before and after fine-tuning" in result.stdout

    run = tmp_path / "runs" / "quickstart"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval_loss"] < summary["eval_loss_before"]
    preview = json.loads((run / "preview.json").read_text())
    assert len(preview) == 3 and all(row["before"] != row["after"] for row in preview)
    assert f"eval loss {summary['eval_loss_before']:.4f} -> {summary['final_eval_loss']:.4f}" in result.stdout
