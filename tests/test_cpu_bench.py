"""The CPU benchmark's report (python -m benchmarks cpu): the spread of its repeats and when a ratio is no
measurable difference, batches proven identical hash by hash, and the docs section it rewrites."""

from __future__ import annotations

import pytest


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


def cpu_results(ours_steps: list[float], plain_steps: list[float]) -> dict:
    """A benchmarks/cpu.py results file with these per-repeat steady step times (10 steady steps per repeat)."""

    def run(step: float) -> dict:
        return {"steady_seconds": 10 * step, "steady_cpu_seconds": 20 * step, "steady_steps": 10}

    method = {
        "weights_bytes": 2**20,
        "peak_memory_bytes": 2**30,
        "trainable_params": 10,
        "trainable_percent": 1.0,
        "saved_bytes": 2**20,
        "supervised_tokens": 1234,
        "batches": 3,
    }
    return {
        "date": "2026-01-01",
        "machine": "test machine",
        "command": "python -m benchmarks cpu",
        "bench_seconds": 1.0,
        "train_model": {"hidden": 64, "layers": 1, "parameters": 1e6, "max_length": 32},
        "trainers": {
            "repeats": len(ours_steps),
            "steps": 11,
            "batches": 11,
            "batch_digest": "ab" * 32,
            "ours_tokens_per_second": 100.0,
            "plain_tokens_per_second": 100.0,
            "ratio_ours_over_plain": 1.0,
            "ours_peak_memory_bytes": 2**30,
            "plain_peak_memory_bytes": 2**30,
            "runs": {"ours": [run(s) for s in ours_steps], "plain": [run(s) for s in plain_steps]},
        },
        "methods": {"steps": 3, "methods": {"qlora_nf4": method, "lora_bf16": method, "full_bf16": method}},
        "latency": {
            "prompt_tokens": 4,
            "new_tokens": 2,
            **{k: {"ms_per_token": 1.0} for k in ("base", "merged", "adapter_unmerged")},
        },
        "export": {
            "model_bytes_bf16": 2**30,
            "libraries_only_peak_rss_bytes": 2**30,
            "ours_peak_rss_bytes": 2**30,
            "ours_seconds": 1.0,
            "peft_merge_and_unload_peak_rss_bytes": 2**30,
            "peft_seconds": 1.0,
        },
    }


def test_cpu_table_states_the_spread_and_no_difference_within_it():
    from benchmarks.report import markdown_table, trainer_noise

    # Per-repeat ratios plain / ours: 1.05, 1.00, 0.96 -> median 1.00, spread ±4.5%: within the noise.
    result = cpu_results([1.00, 1.00, 1.00], [1.05, 1.00, 0.96])
    noise = trainer_noise(result["trainers"]["runs"])
    assert noise["within_noise"] and noise["steady_ratio_ours_over_plain"]["spread_percent"] == pytest.approx(4.5)
    table = markdown_table(result)
    assert "**no measurable difference at ±4.5%** (median 1.000; 0.960 – 1.050) | ±4.5% |" in table
    assert "| 1.000 s (1.000 – 1.000) | ±0.0% |" in table and "| 1.000 s (0.960 – 1.050) | ±4.5% |" in table
    assert "above the ±3% target" in table and "each of the 11 batches" in table
    # The notes are a paragraph after the table, separated from it, never between its rows.
    assert "| |\n\nSpread: half the range" in table
    # The methods table counts the supervised tokens of the batches trained on.
    assert "| supervised tokens trained (3 steps) |" in table and "| 1.0 MiB | 1,234 |" in table


def test_cpu_table_states_a_ratio_outside_the_spread():
    from benchmarks.report import markdown_table, trainer_noise

    # Every repeat: ours 10% faster, ±1% -> a measured difference, with its spread.
    result = cpu_results([1.00, 1.00, 1.00], [1.09, 1.10, 1.11])
    noise = trainer_noise(result["trainers"]["runs"])
    assert not noise["within_noise"] and noise["verdict"] == "1.100 ±0.9%"
    table = markdown_table(result)
    assert "**1.100 ±0.9%** (median 1.100; 1.090 – 1.110)" in table and "no measurable difference at ±" not in table
    assert "under the ±3% target" in table
    # Repeats that disagree on which side is faster are no measurable difference, whatever the median.
    disagree = trainer_noise(cpu_results([1.0] * 5, [0.99, 1.08, 1.08, 1.09, 1.09])["trainers"]["runs"])
    assert disagree["within_noise"] and disagree["verdict"] == "no measurable difference at ±4.6%"


def test_batches_are_compared_hash_by_hash():
    import torch

    from benchmarks.batches import BatchLog, BatchMismatch, batch_hash, check_same_batches, digest

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 10, 11, -100]])
    log = BatchLog()
    log.record({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    log.record({"input_ids": ids[:1], "labels": labels[:1]})
    assert log.supervised_tokens == 4 + 2  # labels != -100 after the first position, in the batches trained on
    # The token ids decide, not their dtype; one token changed, or a label, is another batch.
    assert batch_hash({"input_ids": ids.int(), "labels": labels}) == log.hashes[0]
    changed = ids.clone()
    changed[1, 3] = 1
    assert batch_hash({"input_ids": changed, "labels": labels}) != log.hashes[0]
    assert batch_hash({"input_ids": ids, "labels": torch.where(labels == 8, -100, labels)}) != log.hashes[0]

    same = log.result()
    runs = {"ours": [dict(same), dict(same)], "plain": [dict(same)]}
    checked = check_same_batches(runs)
    assert checked == {"batches": 2, "batch_digest": digest(log.hashes), "batch_hashes": log.hashes}
    assert all("batch_hashes" not in run for run in runs["ours"])  # recorded once, in the result

    other = {**same, "batch_hashes": list(reversed(same["batch_hashes"]))}  # same totals, other order
    with pytest.raises(BatchMismatch, match=r"plain #1 trained on other batches than ours #1: .* at batch 1"):
        check_same_batches({"ours": [dict(same)], "plain": [other]})
    with pytest.raises(BatchMismatch, match="2 vs 1 batches"):
        check_same_batches({"ours": [{**same, "batch_hashes": same["batch_hashes"][:1]}], "plain": [dict(same)]})
