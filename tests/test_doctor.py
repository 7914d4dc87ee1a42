"""`qlora-pipe doctor` reports the stack against the tested set, and that set agrees with pyproject.toml."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

from qlora_pipe.cli import doctor as doctor_module
from qlora_pipe.cli import main
from tests.helpers.terminal import avx512_bf16_site

REPO = Path(__file__).resolve().parents[1]


def test_doctor_reports_versions_device_and_disk(capsys, tmp_path):
    assert main(["doctor", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ok   torch 2.13.0" in out or "warn torch" in out
    assert "precision auto -> " in out and "ok   bitsandbytes 4-bit kernel: " in out and "GiB free for" in out
    assert "flash-attn" in out and "liger-kernel" in out


def test_doctor_flags_a_version_that_was_not_tested(capsys, monkeypatch):
    import qlora_pipe.cli.doctor as doctor

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


BROKEN_INSTALL = 'raise ImportError("libbitsandbytes_cpu.so: cannot open shared object file")'


def test_bitsandbytes_noise_and_failure(tmp_path):
    """bitsandbytes' import-time notice about its Hub CPU kernel (on AVX512-BF16 CPUs, offline) stays out
    of the terminal but for --debug, and doctor names the kernel runs use. A bitsandbytes that does not
    import fails doctor (non-zero) and is a one-line error in each command that needs it; validate, which
    does not, still works."""
    import os
    import subprocess
    import sys

    from tests.helpers.cli import ENV, assert_one_line_error

    def qlora_pipe(site: Path, *args: str) -> subprocess.CompletedProcess:
        env = {**ENV, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
        command = [sys.executable, "-m", "qlora_pipe.cli", *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)

    avx = avx512_bf16_site(tmp_path)
    notices = (
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",  # kernels, offline
    )
    quiet, debug = qlora_pipe(avx, "doctor"), qlora_pipe(avx, "--debug", "doctor")
    assert quiet.returncode == debug.returncode == 0, quiet.stderr[-2000:]
    for notice in notices:
        assert notice in debug.stderr  # the notice is real on such a CPU, and --debug still shows it
        assert notice not in quiet.stderr + quiet.stdout
    assert "ok   bitsandbytes 4-bit kernel: CPU: NF4 dequantized by bitsandbytes" in quiet.stdout

    broken = tmp_path / "broken"
    (broken / "bitsandbytes").mkdir(parents=True)
    (broken / "bitsandbytes" / "__init__.py").write_text(BROKEN_INSTALL)
    doctor = qlora_pipe(broken, "doctor")
    assert doctor.returncode == 1 and "FAIL bitsandbytes does not load (ImportError: libbitsandbytes_cpu.so" in (
        doctor.stdout
    ), doctor.stdout[-2000:] + doctor.stderr[-2000:]
    recipe = REPO / "recipes" / "quickstart.yaml"
    assert_one_line_error(qlora_pipe(broken, "train", str(recipe)), "qlora-pipe train: bitsandbytes does not load")
    assert_one_line_error(qlora_pipe(broken, "export", str(tmp_path)), "qlora-pipe export: bitsandbytes does not load")
    valid = qlora_pipe(broken, "validate", str(recipe))
    assert valid.returncode == 0 and valid.stderr == "", valid.stderr
