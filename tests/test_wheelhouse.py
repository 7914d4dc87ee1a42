"""`qlora-pipe wheelhouse`: the wheels an offline machine lacks, resolved against what it has, fetched by real
pip from a local folder of real wheels (no network); the slow tests fetch from PyPI and rehearse the GPU check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from qlora_pipe.errors import UserError
from qlora_pipe.wheelhouse import Target, build_wheelhouse, project_requirements, read_have

REPO = Path(__file__).resolve().parents[1]


def make_wheel(folder: Path, name: str, version: str, requires: list[str] = (), tag: str = "py3-none-any") -> Path:
    """A real, installable wheel of an empty package: METADATA with its Requires-Dist, WHEEL, RECORD."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {line}\n" for line in requires)
    files = {
        f"{name.replace('-', '_')}/__init__.py": f"__version__ = {version!r}\n",
        f"{dist}.dist-info/METADATA": metadata,
        f"{dist}.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    path = folder / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for inner, text in files.items():
            archive.writestr(inner, text)
        archive.writestr(
            f"{dist}.dist-info/RECORD", "".join(f"{inner},,\n" for inner in files) + f"{dist}.dist-info/RECORD,,\n"
        )
    return path


@pytest.fixture
def index(tmp_path) -> Path:
    """A local index: two versions of a, three of b, c, d with an extra, e, and f for old Pythons only."""
    folder = tmp_path / "index"
    make_wheel(folder, "pkg-a", "1.0", ["pkg-b>=2", "pkg-c", "pkg-d[fast]", 'pkg-f; python_version < "3.11"'])
    make_wheel(folder, "pkg-a", "2.0", ["pkg-b>=2"])
    for version in ("1.0", "2.0", "3.0"):
        make_wheel(folder, "pkg-b", version)
    make_wheel(folder, "pkg-c", "1.0")
    make_wheel(folder, "pkg-d", "1.0", ['pkg-e>=1; extra == "fast"'])
    make_wheel(folder, "pkg-e", "1.0")
    make_wheel(folder, "pkg-f", "1.0")
    make_wheel(folder, "pkg-g", "1.0", ["pkg-b<2"])
    return folder


def local(index: Path) -> tuple[str, ...]:
    return ("--no-index", f"--find-links={index}")


def test_only_what_the_target_lacks_travels_one_version_each(index, tmp_path):
    target = Target("3.12", have={"pkg-b": Version("1.5"), "pkg-c": None})  # b too old, c of unknown version
    dest = tmp_path / "house"
    pins = {"pkg-a": Version("1.0")}  # the tested version wins where it fits, not the newest
    result = build_wheelhouse(
        dest, target, [Requirement("pkg-a>=1")], log=lambda _: None, sources=local(index), pins=pins
    )
    chosen = {name: str(wheel.version) for name, wheel in result.wheels.items()}
    assert chosen == {"pkg-a": "1.0", "pkg-b": "3.0", "pkg-d": "1.0", "pkg-e": "1.0"}  # no f: Python 3.12
    assert result.wheels["pkg-b"].reason == "has 1.5, needs >=2"
    assert result.assumed == {"pkg-c"}
    assert sorted(p.name for p in dest.glob("*.whl")) == sorted(w.path.name for w in result.wheels.values())
    manifest = json.loads((dest / "wheelhouse.json").read_text())
    assert {w["name"] for w in manifest["wheels"]} == set(chosen) and manifest["assumed_present"] == ["pkg-c"]
    assert all(len(w["sha256"]) == 64 and w["bytes"] > 0 for w in manifest["wheels"])

    old = build_wheelhouse(tmp_path / "old", Target("3.10"), [Requirement("pkg-a==1.0")], lambda _: None, local(index))
    assert "pkg-f" in old.wheels  # the marker is the target's Python, not this one's

    # The folder installs with pip, offline, exactly as documented.
    site = tmp_path / "site"
    wheels = [str(p) for p in dest.glob("*.whl")]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), *wheels],
        check=True,
    )
    assert sorted(p.name for p in site.glob("*.dist-info")) == sorted(
        f"{n.replace('-', '_')}-{v}.dist-info" for n, v in chosen.items()
    )


def test_two_versions_of_one_package_are_refused(index, tmp_path):
    with pytest.raises(UserError, match=r"two versions of pkg-b would be needed: 3\.0 .* pkg-g's <2"):
        build_wheelhouse(
            tmp_path / "house",
            Target(),
            [Requirement("pkg-a==2.0"), Requirement("pkg-g")],
            lambda _: None,
            local(index),
        )


def test_a_folder_with_other_wheels_is_refused_and_kept(index, tmp_path):
    dest = tmp_path / "house"
    stray = make_wheel(dest, "pkg-b", "1.0")  # a leftover: `pip install dest/*.whl` would take it too
    with pytest.raises(UserError, match=r"holds pkg_b-1.0-py3-none-any.whl, but qlora-pipe needs pkg-b>=2"):
        build_wheelhouse(dest, Target(), [Requirement("pkg-b>=2")], lambda _: None, local(index))
    assert stray.is_file()
    other = make_wheel(tmp_path / "other", "pkg-c", "1.0")
    (dest / other.name).write_bytes(other.read_bytes())
    stray.unlink()
    with pytest.raises(UserError, match="does not need \\(pkg-c\\)"):
        build_wheelhouse(dest, Target(), [Requirement("pkg-b>=2")], lambda _: None, local(index))
    assert (dest / other.name).is_file()


def test_project_requirements_for_the_gpu_check_and_the_pipeline():
    check = {r.name.lower() for r in project_requirements("gpu-check")}
    pipeline = {r.name.lower() for r in project_requirements("pipeline")}
    assert {"torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "pydantic"} <= check
    assert pipeline - check == {"gguf", "sentencepiece"}
    with pytest.raises(UserError, match="--extra: nope is not an extra"):
        project_requirements("gpu-check", ("nope",))


def test_have_lists_and_freeze_files(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text(
        "# pip freeze\ntorch==2.11.0+cu130\nmy-pkg @ file:///tmp/my_pkg\n-e git+https://x/y#egg=z\nNumPy\n"
    )
    have = read_have(["transformers==5.17.0"], [freeze])
    assert have == {"torch": Version("2.11.0+cu130"), "my-pkg": None, "numpy": None, "transformers": Version("5.17.0")}
    freeze.write_text("torch==2.11.0\ntorch>=2\n")
    with pytest.raises(UserError, match=r"freeze.txt:2: 'torch>=2' is not NAME==VERSION or NAME"):
        read_have([], [freeze])


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_pipe.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_prints_each_wheel_and_the_total_and_refuses_over_the_size(tmp_path):
    index = tmp_path / "index"
    make_wheel(index, "pydantic", "2.99.0")  # stands for the one package this target lacks (not the tested 2.14.4)
    have = [f"--have={r.name}" for r in project_requirements("gpu-check") if r.name != "pydantic"]
    common = ["wheelhouse", str(tmp_path / "house"), "--for", "gpu-check", "--no-index", f"--find-links={index}", *have]
    done = run_cli(*common, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "pydantic-2.99.0-py3-none-any.whl" in done.stdout and "(missing)" in done.stdout
    assert "total: 1 wheels" in done.stdout and "pip install --no-index --no-deps --target SITE" in done.stdout
    refused = run_cli(*common, "--max-size", "100B", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --max-size: the wheels take")
    assert len(refused.stderr.strip().splitlines()) == 1
    pinned = run_cli(*common, "--pin", "pydantic==2.98.0", cwd=tmp_path)  # not in the index: the newest instead
    assert pinned.returncode == 0 and "pydantic-2.99.0-py3-none-any.whl" in pinned.stdout
    make_wheel(index, "pydantic", "2.98.0")
    (tmp_path / "house" / "pydantic-2.99.0-py3-none-any.whl").unlink()
    pinned = run_cli(*common, "--pin", "pydantic==2.98.0", cwd=tmp_path)
    assert pinned.returncode == 0 and "pydantic-2.98.0-py3-none-any.whl" in pinned.stdout
    bad = run_cli("wheelhouse", str(tmp_path / "h2"), "--have", "torch>=2", cwd=tmp_path)
    assert bad.returncode == 2 and "--have: 'torch>=2' is not NAME==VERSION or NAME" in bad.stderr


SLOW = pytest.mark.skipif(os.environ.get("QLORA_PIPE_SLOW_TESTS") != "1", reason="slow: set QLORA_PIPE_SLOW_TESTS=1")


@SLOW
def test_the_gpu_image_wheelhouse_fits_one_transfer(tmp_path):
    """From PyPI: the wheels this workplace's CUDA image lacks for the GPU check, within 60 MiB."""
    house = tmp_path / "whl"
    args = ["wheelhouse", str(house), "--for", "gpu-check", "--have-file", str(REPO / "benchmarks/gpu_image.txt")]
    done = run_cli(*args, "--max-size", "60MiB", cwd=REPO)
    assert done.returncode == 0, done.stderr
    names = {w["name"] for w in json.loads((house / "wheelhouse.json").read_text())["wheels"]}
    assert {"bitsandbytes", "trl", "datasets", "pydantic", "pydantic-core", "transformers", "peft"} <= names
    assert "torch" not in names and "accelerate" not in names


def rehearsal_venv() -> tuple[Path, Path]:
    """A venv standing for the CUDA image: its versions, but this disk's CPU torch (the image has 2.11+cu130)."""
    lines = (REPO / "benchmarks/gpu_image.txt").read_text().splitlines()
    wanted = []
    for line in lines:
        if line.startswith(("#", "triton")) or not line.strip():
            continue  # triton is CUDA's
        wanted.append(
            "torch==2.13.0" if line.startswith("torch==") else line.split("==")[0] if "numpy" in line else line
        )
    key = str(abs(hash("\n".join(wanted))) % 10**8)
    venv = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / f"qlora-pipe/rehearsal-{key}"
    have = venv / "image.txt"
    if not (venv / ".complete").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        have.write_text("\n".join(wanted) + "\n")
        subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "-r", str(have)], check=True)
        (venv / ".complete").write_text("ok\n")
    return venv, have


@SLOW
def test_rehearsal_the_gpu_check_runs_from_the_wheelhouse_on_the_image_stack(tmp_path):
    """The CUDA image's stack (transformers 5.17, accelerate 1.15, huggingface-hub 1.33, no bitsandbytes, trl,
    datasets or pydantic) plus only the wheelhouse: the GPU check's dry run goes to the end, every stage ok."""
    venv, have = rehearsal_venv()
    python = venv / "bin/python"
    version = subprocess.run(
        [str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    house, site, out = tmp_path / "whl", tmp_path / "site", tmp_path / "out"
    done = run_cli(
        "wheelhouse", str(house), "--for", "gpu-check", "--python-version", version, "--have-file", str(have), cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--target",
            str(site),
            *map(str, house.glob("*.whl")),
        ],
        check=True,
    )
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "PYTHONPATH": f"{site}:{REPO}",
        "QLORA_PIPE_RESULTS": str(out),
        "QLORA_PIPE_CHECK_SECONDS": "3000",  # a GPU's 8 minutes are far too few for CPU stages on 2 busy cores
    }
    probe = "import transformers, trl, bitsandbytes; print(transformers.__version__, transformers.__file__)"
    seen = subprocess.run([str(python), "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert seen.startswith("5.2") and str(site) in seen  # the wheelhouse's transformers shadows the image's 5.17
    check = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry", "--stage-limit", "600"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    result = json.loads((out / "gpu-dry.json").read_text())
    assert result["errors"] == {}
    for stage in ("lengths", "longest_sequence", "quickstart_pipeline", "resume_after_sigterm", "torchtune_anchor"):
        assert stage in result, stage
