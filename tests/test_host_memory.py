"""Peak host memory of a stage: anonymous memory and memory-mapped files apart, as training and export report it."""

from __future__ import annotations

import json
import mmap
import time

import numpy as np
import pytest

from qlora_pipe.machine.host_memory import HostMemory, read_status

pytestmark = pytest.mark.skipif(not read_status(), reason="needs Linux's /proc/self/status")
MIB = 2**20


def test_anonymous_memory_and_mapped_file_pages_are_told_apart(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * (192 * MIB))
    start = read_status()["RssAnon"]  # what this process (a whole test session, maybe) already holds
    with (
        HostMemory() as mapped,
        path.open("rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view,
    ):
        total = sum(view[i] for i in range(0, len(view), 4096))  # every page read: resident, file-backed
        time.sleep(0.2)
    assert total == 192 * MIB // 4096
    report = mapped.report()
    assert report["peak_file_mapped_bytes"] >= 180 * MIB
    assert report["peak_anonymous_bytes"] - start < 64 * MIB  # reading mapped pages allocates nothing
    start = read_status()["RssAnon"]
    with HostMemory() as anonymous:
        block = np.ones(192 * MIB, dtype=np.uint8)
        time.sleep(0.2)
        del block
    report = anonymous.report()
    assert report["peak_anonymous_bytes"] - start >= 180 * MIB  # the block, at least
    assert report["peak_resident_bytes"] >= report["peak_anonymous_bytes"]
    assert "GiB anonymous" in anonymous.line() and "memory-mapped files" in anonymous.line()


def test_training_and_export_record_their_host_peaks(make_recipe):
    from qlora_pipe.export.command import export_merged
    from qlora_pipe.training.stage import run_training

    result = run_training(make_recipe(max_steps=1))
    trained = result.summary["host_memory"]
    assert 0 < trained["peak_anonymous_bytes"] <= trained["peak_resident_bytes"]
    assert json.loads(result.run_dir.summary.read_text())["host_memory"] == trained
    export_merged(result.run_dir.root, verify=False)
    exported = json.loads((result.run_dir.root / "merged/export_info.json").read_text())["host_memory"]
    assert 0 < exported["peak_anonymous_bytes"] <= exported["peak_resident_bytes"]
