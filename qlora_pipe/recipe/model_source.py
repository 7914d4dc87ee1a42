"""Where a model comes from: a local directory or a Hugging Face Hub id. One rule, used by loading,
planning, export and model cards alike."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

from qlora_pipe.errors import UserError

log = logging.getLogger(__name__)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_local(name: str) -> bool:
    """A path (./x, /x, ~/x, a/b/c) or anything that exists on disk; otherwise a Hub id like org/name."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def local_path(name: str) -> Path | None:
    """The expanded local path of ``name``, or None for a Hub id."""
    return Path(name).expanduser() if is_local(name) else None


def check_local_dir(name: str, key: str = "model.name_or_path") -> None:
    """Fail before any download when a name that is a local path is not a directory."""
    path = local_path(name)
    if path is not None and not path.is_dir():
        raise UserError(f"{key}: directory not found: {name}")


def check_model_files(name: str, trust_remote_code: bool, key: str = "model.name_or_path") -> None:
    """A local model directory that can be loaded safely: readable config, no code to run unless allowed,
    safetensors weights that are whole. Pickle weights can execute code when loaded: refused."""
    path = local_path(name)
    if path is None:
        return
    check_local_dir(name, key)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{key}: {path} has no config.json; is it a transformers model directory?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{key}: {config_path} is not valid JSON ({exc})") from exc
    check_remote_code(name, config, trust_remote_code, key)
    weights = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not weights and pickles:
        raise UserError(
            f"{key}: the weights in {path} are pickle files ({pickles[0].name}), which can run code when loaded; "
            "refused: convert them to safetensors"
        )
    for file in weights:
        problem = safetensors_problem(file)
        if problem:
            raise UserError(f"{key}: {file} {problem}; cannot load this model (copy or download it again)")


def check_remote_code(name: str, config: dict, trust_remote_code: bool, key: str = "model.name_or_path") -> None:
    auto_map = config.get("auto_map")
    if not auto_map:
        return
    if not trust_remote_code:
        raise UserError(
            f"{key}: {name}'s config asks to run its own code (auto_map: {', '.join(auto_map)}); refused: set "
            "model.trust_remote_code: true only if you trust that code"
        )
    log.warning("notice: %s runs its own code (auto_map), as model.trust_remote_code allows", name)


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (truncated, bad header), or None: checked from its header alone."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                return "is truncated (its header is longer than the file)"
            header = json.loads(handle.read(header_len))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError):
        return "is not a safetensors file (unreadable header)"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"is truncated ({size:,} of {expected:,} bytes)"
    return None
