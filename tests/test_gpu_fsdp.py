"""The GPU check's multi-GPU stage (benchmarks/gpu_fsdp.py), on CPU: the wider base it trains is a real model
that transformers reloads with the quickstart's tokenizer, and the report puts each run beside the plan that
qlora-pipe's own planner wrote for it."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.gpu_fsdp import report, write_base
from tests.conftest import REPO


def test_the_fsdp_stage_base_and_report(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "models" / "fsdp-base"
    dims = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=False,
    )
    write_base(tiny_model_dir, out, dims)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and not model.config.tie_word_embeddings
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(tiny_model_dir))

    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    (tmp_path / "data").symlink_to(REPO / "data")
    for name, extra in (("plan-1.json", []), ("plan-n.json", ["--gpus", "2"])):
        plan = subprocess.run(
            [
                sys.executable,
                "-m",
                "qlora_pipe.cli",
                "plan",
                "recipes/quickstart.yaml",
                "--set",
                f"model.name_or_path={out}",
                "--set",
                "quantization.quant_storage=bfloat16",
                "--set",
                "quantization.compute_dtype=bfloat16",
                "--set",
                "training.precision=bf16",
                "--json",
                *extra,
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        (tmp_path / name).write_text(plan.stdout)
    summary = {
        "peak_memory_bytes": 3 * 2**20,
        "peak_memory_kind": "cuda max_memory_allocated",
        "supervised_tokens_per_second": 100.0,
        "device": "cpu",
    }
    (tmp_path / "runs" / "one-gpu").mkdir(parents=True)
    (tmp_path / "runs" / "one-gpu" / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "fsdp.log").write_text("Traceback ...\nRuntimeError: NCCL error\n")

    result = report(2, 0, 1, tmp_path)
    planned = json.loads((tmp_path / "plan-1.json").read_text())["allocated"]
    assert result["one_gpu"]["measured_over_planned"] == round(3 * 2**20 / planned, 3)
    assert result["fsdp"]["exit"] == 1 and "NCCL error" in result["fsdp"]["log_tail"]
    sharded = json.loads((tmp_path / "plan-n.json").read_text())
    assert result["fsdp"]["planned_allocated_bytes"] == sharded["allocated"] != planned  # one GPU's share
    assert "fsdp_speedup_over_one_gpu" not in result  # the FSDP run measured nothing
