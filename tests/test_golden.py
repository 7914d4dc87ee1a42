"""Golden numbers: a fixed fp32 run of the tiny model, pinned step by step, and its merged weights.

A library upgrade (TRL, transformers, PEFT, bitsandbytes, torch) that changes what training computes
moves these numbers; the test then names the first step that diverged. fp32 keeps the list portable
across x86 CPUs: AVX2, AVX-512 and AMX kernels only change low-order bits. Measured on an AMX Xeon,
natively and with ATen, MKL and oneDNN capped at AVX2: losses within 2.3e-7 relative, gradient norms
7.6e-6, merged-weight checksums 1.4e-5 (bf16 rounding of a few merged weights), all inside rtol 1e-4;
setting weight_decay 0.01 instead of 0 is caught at step 3 (gradient norm off by 1.07e-4).
To accept a deliberate change, regenerate the list and commit it with the reason:

    QLORA_PIPE_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden/tiny_llama_fp32.json"
RTOL = 1e-4


def merged_weight_stats(folder: Path) -> dict[str, list[float]]:
    """Per tensor of the merged model: sum of absolute values and of squares in fp64 (a checksum with a
    tolerance; a plain sum cancels out and is no checksum)."""
    from safetensors import safe_open

    stats = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                value = handle.get_tensor(name).double()
                stats[name] = [value.abs().sum().item(), value.square().sum().item()]
    return dict(sorted(stats.items()))


def golden_numbers(make_recipe) -> dict:
    from qlora_pipe.export.command import export_merged
    from qlora_pipe.training.stage import run_training

    recipe = make_recipe(precision="fp32", quantization={"compute_dtype": "float32"}, max_steps=8)
    result = run_training(recipe)
    rows = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines()]
    exported = export_merged(result.run_dir.root)
    return {
        "train_loss": [r["loss"] for r in rows if "loss" in r],
        "grad_norm": [r["grad_norm"] for r in rows if "grad_norm" in r],
        "eval_loss_before": result.summary["eval_loss_before"],
        "final_eval_loss": result.summary["final_eval_loss"],
        "merged_weights": merged_weight_stats(Path(exported.out)),
    }


def close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(abs(a), abs(b), 1e-12)


def first_divergence(expected: dict, got: dict) -> str | None:
    """The first number that moved, named (step, tensor), or None."""
    for key in ("train_loss", "grad_norm"):
        if len(expected[key]) != len(got[key]):
            return f"{key}: {len(got[key])} steps logged, golden has {len(expected[key])}"
        for step, (want, have) in enumerate(zip(expected[key], got[key], strict=True), start=1):
            if not close(want, have):
                return f"{key} diverged at step {step}: golden {want!r}, got {have!r} (rtol {RTOL})"
    for key in ("eval_loss_before", "final_eval_loss"):
        if not close(expected[key], got[key]):
            return f"{key}: golden {expected[key]!r}, got {got[key]!r}"
    if set(expected["merged_weights"]) != set(got["merged_weights"]):
        changed = sorted(set(expected["merged_weights"]) ^ set(got["merged_weights"]))
        return "merged model tensors differ: " + ", ".join(changed)
    for name, want in expected["merged_weights"].items():
        have = got["merged_weights"][name]
        if not all(close(w, h) for w, h in zip(want, have, strict=True)):
            return f"merged tensor {name}: golden sum of |w| and of w^2 {want}, got {have}"
    return None


def test_tiny_fp32_run_matches_the_golden_numbers(make_recipe):
    got = golden_numbers(make_recipe)
    if os.environ.get("QLORA_PIPE_WRITE_GOLDEN") == "1":
        from importlib.metadata import version

        from qlora_pipe.machine.hardware import machine_description
        from qlora_pipe.training.stage import LIBRARIES

        got["written_on"] = machine_description()
        got["versions"] = {name: version(name) for name in LIBRARIES}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    expected = json.loads(GOLDEN.read_text())
    assert len(got["train_loss"]) == 8 and got["train_loss"][-1] < got["train_loss"][0]
    problem = first_divergence(expected, got)
    assert problem is None, (
        f"{problem}. If a library upgrade changed this on purpose: "
        "QLORA_PIPE_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py, and commit the list with the reason"
    )


def test_divergence_is_named_by_step():
    golden = {"train_loss": [2.0, 1.5, 1.0], "grad_norm": [1.0, 1.0, 1.0], "eval_loss_before": 3.0}
    golden |= {"final_eval_loss": 1.0, "merged_weights": {"w": [1.0, 2.0]}}
    assert first_divergence(golden, json.loads(json.dumps(golden))) is None
    moved = json.loads(json.dumps(golden))
    moved["train_loss"][1] = 1.5 * (1 + 3 * RTOL)
    assert first_divergence(golden, moved).startswith("train_loss diverged at step 2")
    moved = json.loads(json.dumps(golden))
    moved["merged_weights"]["w"][1] = 2.01
    assert "merged tensor w" in first_divergence(golden, moved)
