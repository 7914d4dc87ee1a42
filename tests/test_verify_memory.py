"""Verification's memory, decided before the merge from the files: refused in one line when even a block at a time
does not fit, the merged model checked a decoder block at a time when only that fits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers.export_models import finished_run

REPO = Path(__file__).resolve().parents[1]


def test_verification_that_cannot_fit_is_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    """The trained 4-bit model, the merged model (in the dtype it is served in here) and one row's logits are
    counted from the files before the merge starts; more than the machine has is one line, exit 2, no files."""
    import os

    from qlora_pipe.export.merge import quantized_weight_names
    from qlora_pipe.export.verify_memory import AVAILABLE_ENV, preflight_verification
    from qlora_pipe.machine.hardware import dtype_for_inference
    from qlora_pipe.recipe import load_recipe
    from qlora_pipe.runs import RunDir

    run, size = finished_run(tmp_path / "model", 4, tiny_model_dir)
    recipe_path = run / "recipe.resolved.yaml"
    recipe_path.write_text(recipe_path.read_text().replace("verify: false", "verify: true"))
    recipe = load_recipe(recipe_path)
    base = Path(recipe.model.name_or_path)
    terms = preflight_verification(recipe, RunDir(run), base, "bfloat16")["terms"]
    served = getattr(torch, dtype_for_inference("bfloat16")).itemsize
    assert terms["merged model"] == size // 2 * served  # every tensor of this base is 16-bit floating point
    quantized = quantized_weight_names(base, recipe)
    assert len(quantized) == 4 * 7  # q, k, v, o, gate, up, down per layer; lm_head stays 16-bit
    assert size * 0.05 < terms["trained model (4-bit base + adapter)"] < size * 0.7
    command = [sys.executable, "-m", "qlora_pipe.cli", "export", str(run)]
    env = {**os.environ, AVAILABLE_ENV: "16MiB", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    line = [ln for ln in out.stderr.splitlines() if "verification needs" in ln]
    assert len(line) == 1 and "0.02 GiB available (QLORA_PIPE_AVAILABLE_MEMORY)" in line[0], out.stderr[-2000:]
    assert "merged model" in line[0] and "--no-verify" in line[0]
    assert not (run / "merged").exists() and not (run / "merged.partial").exists()
    env[AVAILABLE_ENV] = "64GiB"
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    fidelity = json.loads((run / "merged" / "fidelity.json").read_text())
    assert fidelity["passed"] and fidelity["memory"]["terms"] == terms
    assert fidelity["memory"]["merged_loaded"] == "whole"  # with the memory for it, never a block at a time


def test_a_merged_model_too_large_to_hold_is_verified_a_block_at_a_time(tiny_model_dir, tmp_path):
    """When the merged model does not fit whole but fits a decoder block at a time, verification reads each
    block from the export's own files as it runs: the same verdict and the same logits, bit for bit, as the
    whole model; with less memory than even that, the refusal names both figures."""
    import os

    from qlora_pipe.export.fidelity import served_model
    from qlora_pipe.export.streamed_model import STREAMED
    from qlora_pipe.export.verify_memory import (
        AVAILABLE_ENV,
        loads_noise_copy,
        preflight_verification,
        verification_peak,
    )
    from qlora_pipe.machine.hardware import with_resolved_precision
    from qlora_pipe.recipe import load_recipe
    from qlora_pipe.runs import RunDir

    run, size = finished_run(tmp_path / "model", 4, tiny_model_dir)
    recipe_path = run / "recipe.resolved.yaml"
    recipe_path.write_text(recipe_path.read_text().replace("verify: false", "verify: true"))
    recipe = load_recipe(recipe_path)
    terms = preflight_verification(recipe, RunDir(run), Path(recipe.model.name_or_path), "bfloat16")["terms"]
    blockwise = terms["merged model, one decoder block at a time"]
    layer = (4 * 512 * 512 + 3 * 512 * 1408) * terms["merged model"] // (size // 2)  # one block, as served
    assert blockwise - layer < terms["merged model"] / 4, terms  # outside the blocks: embeddings, head, norms
    noise = loads_noise_copy(with_resolved_precision(recipe), "bfloat16")
    whole_peak, block_peak = verification_peak(terms, noise), verification_peak(terms, noise, streamed=True)
    assert block_peak < whole_peak, terms

    command = [sys.executable, "-m", "qlora_pipe.cli", "export", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", AVAILABLE_ENV: str((whole_peak + block_peak) // 2)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    streamed = json.loads((run / "merged" / "fidelity.json").read_text())
    assert streamed["memory"]["merged_loaded"] == STREAMED and streamed["passed"], streamed
    assert streamed["host_memory"]["peak_anonymous_bytes"] > 0 and streamed["seconds"] > 0

    model = served_model(run / "merged", torch.bfloat16, streamed=True)
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())  # read from disk as they run
    assert model.lm_head.weight.device.type == "cpu"
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.equal(logits, served_model(run / "merged", torch.bfloat16)(input_ids=ids).logits)

    env[AVAILABLE_ENV] = str(block_peak * 9 // 10)
    refused = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert refused.returncode == 2, refused.stderr[-2000:]
    line = [ln for ln in refused.stderr.splitlines() if "verification needs" in ln]
    assert len(line) == 1 and "one decoder block at a time" in line[0] and "whole" in line[0], refused.stderr
    assert json.loads((run / "merged" / "fidelity.json").read_text()) == streamed  # the earlier export stays
