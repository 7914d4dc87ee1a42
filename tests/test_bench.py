"""The GPU check's dry mode runs here on CPU (tiny shapes, real 4-bit build, real trainer path) so it cannot rot."""

from __future__ import annotations

import json


def test_gpu_check_dry_run_measures_every_length_and_searches(tmp_path):
    from benchmarks.gpu import main

    assert main(["--dry", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu-dry.json").read_text())
    assert result["dry"] is True and result["device"] == "cpu (dry run)"
    assert [row["length"] for row in result["lengths"]] == [32, 64]
    for row in result["lengths"]:
        assert row["tokens_per_second"] > 0 and row["model_flops_per_step"] > 0
        assert row["mfu"] is None  # no peak FLOPs without a GPU
        planned = row["planned"]  # the planner's prediction sits beside each measurement
        assert 0 < planned["allocated"] < planned["total"] and "transient peak" in planned["terms"]
    search = result["longest_sequence"]
    assert search["longest_fitting_length"] == search["search_limit"] == 128  # nothing runs out of memory on CPU
    assert result["trainable_params"] > 0
    # Every switch has a measurement or the reason it was not run (the GPU-only ones, on CPU).
    switches = {row["switch"]: row for row in result["switches"]}
    assert set(switches) == {"training.activation_offloading", "training.torch_compile", "training.liger_kernels"}
    assert "needs a CUDA GPU" in switches["training.activation_offloading"]["skipped"]
    assert result["references"]["unsloth_llama3.1_8b_qlora_longest_context_24gb"]["tokens"] == 78475


def test_four_bit_build_matches_the_config(tmp_path):
    import bitsandbytes as bnb
    import torch

    from benchmarks.gpu_model import build_4bit_llama, llama_config

    config = llama_config(dry=True)
    model = build_4bit_llama(config, torch.device("cpu"))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * config.num_hidden_layers  # q k v o gate up down; lm_head stays bf16
    assert all(m.weight.quant_state is not None for m in quantized)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, config.vocab_size) and torch.isfinite(logits).all()


def test_docs_section_is_rewritten_only_between_the_markers(tmp_path, monkeypatch):
    from benchmarks import report

    page = tmp_path / "performance.md"
    page.write_text(f"# title\n\nkept\n{report.START}old numbers\n{report.END}after\n")
    monkeypatch.setattr(report, "DOC", page)
    monkeypatch.setattr(report, "docs_section", lambda result, path: f"from {path.name}\n")
    results = tmp_path / "r.json"
    results.write_text("{}")
    report.update_docs(results)
    assert page.read_text() == f"# title\n\nkept\n{report.START}from r.json\n{report.END}after\n"
