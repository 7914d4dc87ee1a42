"""`qlora-pipe doctor` reports the stack against the tested set, and that set agrees with pyproject.toml."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

from qlora_pipe import doctor as doctor_module
from qlora_pipe.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_doctor_reports_versions_device_and_disk(capsys, tmp_path):
    assert main(["doctor", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ok   torch 2.13.0" in out or "warn torch" in out
    assert "precision auto -> " in out and "bitsandbytes backend:" in out and "GiB free for" in out
    assert "flash-attn" in out and "liger-kernel" in out


def test_doctor_flags_a_version_that_was_not_tested(capsys, monkeypatch):
    import qlora_pipe.doctor as doctor

    real = doctor.installed
    monkeypatch.setattr(doctor, "installed", lambda name: "0.9.0" if name == "trl" else real(name))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "warn trl 0.9.0 (tested with 1.16.0)" in out
    assert "version(s) differ from the tested set: pip install -c qlora_pipe/constraints.txt" in out


def test_the_tested_set_is_allowed_by_pyproject():
    """Every pin of qlora_pipe/constraints.txt satisfies the package's own dependency ranges."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {Requirement(d).name.lower().replace("-", "_"): Requirement(d).specifier for d in dependencies}
    pins = doctor_module.tested_versions()
    assert {"torch", "transformers", "peft", "bitsandbytes", "trl"} <= set(pins)
    for name, pinned in pins.items():
        key = name.lower().replace("-", "_")
        if key in ranges:
            assert ranges[key].contains(pinned), f"{name}=={pinned} is outside pyproject's {ranges[key]}"
