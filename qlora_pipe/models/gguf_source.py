"""A GGUF file as the base model: the model a user already runs in llama.cpp or Ollama.

transformers reads a GGUF (tokenizer, chat template, config, weights dequantized to fp32) but refuses to
save such a model, and every stage here reads a plain folder (the NF4 load, the streaming merge, the planner).
So a GGUF is converted once into a plain bf16 safetensors folder in the cache, named by the file's sha256
(read once per file version: user_cache.sha256_of), so a file replaced under the same name, even with its size
and modification time kept, is never served the conversion of another; runs, cards and exports record that
file (name, quantization type, sha256) as the starting point.

The light checks (is this a GGUF, is its header whole) import nothing heavy; the conversion needs the
``gguf`` extra and loads the whole model once in fp32 (4 bytes per parameter of RAM).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.machine.user_cache import cache_home, cache_refusal, disk_cause, locked, sha256_of
from qlora_pipe.runs import write_json_atomic

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
SOURCE_FILE = "source.json"  # written last: a cache folder without it is incomplete
EXTRA_HINT = "pip install -e '.[gguf]'"


def gguf_file_of(name: str) -> Path | None:
    """The GGUF file ``name`` points at (a .gguf file, or a folder holding exactly one and no config.json),
    or None for a plain model folder or a Hub id."""
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"model.name_or_path: GGUF file not found: {name}")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4])
        raise UserError(f"model.name_or_path: {name} holds {len(found)} GGUF files ({names}); name one of them")
    return found[0] if found else None


def check_gguf_file(path: Path) -> None:
    """A one-line refusal of a file that is not a whole GGUF: wrong magic, unknown version, cut short."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(24)
    if head[:4] != MAGIC:
        raise UserError(f"model.name_or_path: {path} is not a GGUF file (it does not start with 'GGUF')")
    if len(head) < 24:
        raise UserError(f"model.name_or_path: {path} is truncated ({size} bytes)")
    version, tensors, _ = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise UserError(f"model.name_or_path: {path} is GGUF version {version}; versions 2 and 3 are supported")
    if tensors == 0:
        raise UserError(f"model.name_or_path: {path} holds no tensors (a vocabulary-only GGUF?)")
    try:
        reader = _reader(path)
    except UserError:  # the missing extra: its own message
        raise
    except Exception as exc:  # the gguf reader raises ValueError, IndexError, ... on a damaged file
        raise UserError(f"model.name_or_path: {path} is damaged or truncated ({type(exc).__name__}: {exc})") from exc
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise UserError(f"model.name_or_path: {path} is truncated ({size:,} of {end:,} bytes)")


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise UserError(f"model.name_or_path: a GGUF base needs the gguf extra: {EXTRA_HINT}") from exc
    return GGUFReader(str(path))


def gguf_facts(path: Path) -> dict[str, Any]:
    """What a card and a run say of the starting GGUF: its name, architecture and quantization."""
    from gguf import LlamaFileType

    reader = _reader(path)

    def field(key: str) -> Any:
        value = reader.fields.get(key)
        return value.contents() if value is not None else None

    file_type = field("general.file_type")
    try:
        quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else "unknown"
    except ValueError:
        quant = f"file type {file_type}"
    return {"architecture": field("general.architecture"), "name": field("general.name"), "quantization": quant}


def gguf_config(path: Path) -> dict[str, Any]:
    """config.json of the model in a GGUF, from its metadata alone (the planner needs no weights)."""
    from transformers import AutoConfig

    check_gguf_file(path)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"model.name_or_path: {path.name}: transformers cannot read this GGUF ({reason})") from exc
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "bfloat16"  # the model stage loads the folder _convert writes, in bf16
    return config_dict


def cache_root() -> Path:
    return cache_home() / "gguf-bases"


def cache_folder(path: Path) -> Path:
    """One folder per file content: the conversion of these exact bytes, wherever the file lies."""
    return cache_root() / f"{path.stem}-{sha256_of(path)[:16]}"


def gguf_source(path: Path) -> dict[str, Any]:
    """What a run, a card and a converted folder record of the starting GGUF: where, its sha256, its facts."""
    source = {"gguf": str(path.resolve()), "size": path.stat().st_size, "sha256": sha256_of(path)}
    return {**source, **gguf_facts(path), "dtype": "bfloat16"}


def base_folder(path: Path) -> Path:
    """The plain folder converted from this GGUF, converting it on first use. One process converts, under a
    lock; the others wait for it and use its folder."""
    version = _version(path)
    folder = cache_folder(path)
    if (folder / SOURCE_FILE).is_file():
        return folder
    check_gguf_file(path)
    waiting = f"model: waiting for another process to convert {path.name}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with locked(folder.parent / f".{folder.name}.lock", waiting):
            if (folder / SOURCE_FILE).is_file():
                return folder  # the process we waited for converted it
            log.info("model: converting %s into a plain bf16 folder, once (%s)", path.name, folder)
            _convert_into(path, folder, version)
    except UserError:
        raise
    except Exception as exc:  # OSError, or safetensors' own error quoting the OS's
        if disk_cause(exc) is None:
            raise
        needed = 2 * sum(int(t.n_elements) for t in _reader(path).tensors)  # bf16 weights
        raise cache_refusal(f"model.name_or_path: converting {path.name}", folder.parent, exc, needed) from exc
    return folder


def _convert_into(path: Path, folder: Path, version: tuple[int, ...]) -> None:
    """Convert in a staging folder, then rename it into place. Called under the entry's lock, so what holds
    the entry's name without its source.json (written last), or a staging folder left by a conversion that
    was killed, is an incomplete entry of this cache: replaced, once."""
    for leftover in folder.parent.glob(f".{folder.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    try:
        _convert(path, staging)
        source = gguf_source(path)
        if _version(path) != version:
            raise UserError(f"model.name_or_path: {path} changed while it was being converted; run the command again")
        write_json_atomic(staging / SOURCE_FILE, source)
        if folder.exists():
            log.warning("model: %s lacked %s (incomplete): replaced", folder, SOURCE_FILE)
            stale = folder.with_name(f".{folder.name}.partial-stale")
            os.replace(folder, stale)
            shutil.rmtree(stale)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # our own temporary folder, nothing else
        raise


def _version(path: Path) -> tuple[int, ...]:
    stat = path.stat()
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def source_of(folder: str | Path) -> dict[str, Any] | None:
    """``source.json`` of a converted base folder (the GGUF it came from), or None for any other folder."""
    file = Path(folder).expanduser() / SOURCE_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def base_source(recipe) -> dict[str, Any] | None:
    """The GGUF a recipe's base comes from (file, sha256, quantization), read from the file itself, or None
    for any other base."""
    gguf = gguf_file_of(recipe.model.name_or_path)
    return gguf_source(gguf) if gguf is not None else None


def _convert(path: Path, out: Path) -> None:
    """Tokenizer (with the file's chat template), config and weights into ``out``. transformers' GGUF-loaded
    model will not save itself, so its state dict moves into a plain model built from the same config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from accelerate import init_empty_weights
    from qlora_pipe.compat.transformers import gguf_bar_follows_switch

    _reader(path)  # the extra, before transformers says the same less clearly
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        with gguf_bar_follows_switch():  # its own bar, blind to the switch --debug turns on
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"model.name_or_path: {path.name}: transformers cannot load this GGUF ({reason})") from exc
    state = loaded.state_dict()
    del loaded
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(
            f"model.name_or_path: {path.name}: the converted weights do not fit the model "
            f"(missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
