"""`python -m benchmarks methods`: every method trains on the same batches and gets every column measured,
on a tiny model in a few steps (the numbers themselves come from the full command, in the README)."""

from __future__ import annotations

import json

from benchmarks.method_runs import METHODS
from benchmarks.methods import main, table


def test_every_method_gets_every_column(tiny_model_dir, tmp_path):
    argv = ["--model", str(tiny_model_dir), "--steps", "3", "--train-rows", "24", "--eval-rows", "8",
            "--latency-repeats", "1", "--new-tokens", "4", "--prompt-tokens", "16", "--in-process",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(next(tmp_path.glob("methods-*.json")).read_text())
    rows = result["methods"]
    assert list(rows) == list(METHODS)
    total = result["settings"]["total_params"]
    for key, row in rows.items():
        for column in ("trainable_params", "peak_rss_bytes", "storage_bytes", "ms_per_token_base",
                       "ms_per_token_unmerged", "eval_loss_before", "eval_loss_after"):  # fmt: skip
            assert row[column] is not None and row[column] > 0, (key, column)
        assert (row["ms_per_token_merged"] is not None) == METHODS[key].mergeable, key
        assert row["eval_loss_after"] < row["eval_loss_before"], key  # each method learned something in 3 steps
    assert rows["full"]["trainable_params"] == total
    assert rows["prompt_tuning"]["trainable_params"] == 20 * 128  # 20 virtual tokens x hidden size
    assert rows["prefix_tuning"]["trainable_params"] == 20 * 2 * 2 * 64  # tokens x layers x (k, v) x kv width
    assert rows["lora"]["trainable_params"] == rows["qlora"]["trainable_params"] < rows["dora"]["trainable_params"]
    assert rows["prompt_tuning"]["storage_bytes"] < rows["lora"]["storage_bytes"] < rows["full"]["storage_bytes"]
    lines = table(result).splitlines()
    assert len(lines) == 2 + len(METHODS) + 1 and "requires transformers" in lines[-1]
    assert all(line.count("|") == 9 for line in lines)
