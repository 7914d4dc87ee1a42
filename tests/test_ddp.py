"""Two processes (torchrun, gloo on CPU) train the same recipe as one process at the same effective batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import free_port, recipe_dict

REPO = Path(__file__).resolve().parents[1]


def metrics(run: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


def test_two_process_ddp_matches_one_process(tiny_model_dir, tmp_path):
    paths = {}
    for name, micro in (("single", 4), ("ddp", 2)):  # effective batch 4 either way
        raw = recipe_dict(tiny_model_dir, tmp_path / "runs", max_steps=4, micro_batch_size=micro, save_steps=2)
        raw["run_name"] = name
        raw["quantization"] = {"compute_dtype": "float32"}
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(raw))
    cli = ["-m", "qlora_pipe.cli", "train"]
    single = subprocess.run([sys.executable, *cli, str(paths["single"])], cwd=REPO, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    ddp = subprocess.run([*launcher, *cli, str(paths["ddp"])], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one, two = tmp_path / "runs/single", tmp_path / "runs/ddp"
    (loss1, eval1), (loss2, eval2) = metrics(one), metrics(two)
    assert len(loss1) == len(loss2) == 4
    assert all(abs(a - b) < 1e-3 for a, b in zip(loss1 + eval1, loss2 + eval2, strict=True))
    s1, s2 = (json.loads((run / "summary.json").read_text()) for run in (one, two))
    assert s2["processes"] == 2 and s1["supervised_tokens"] == s2["supervised_tokens"]
    # Only rank 0 wrote the run: four train-loss lines (not eight), one "finished" message.
    assert ddp.stdout.count("finished:") == 1
