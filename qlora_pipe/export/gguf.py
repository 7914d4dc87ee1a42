"""`qlora-pipe export --format gguf`: the verified merged folder -> a GGUF file for llama.cpp and Ollama.

The conversion is llama.cpp's own ``convert_hf_to_gguf.py`` (f16, bf16, q8_0), run in its own process
through qlora_pipe/compat/llama_cpp.py; k-quants (q4_k_m, ...) are llama.cpp's quantizer through
llama-cpp-python. The converter comes from a llama.cpp checkout (QLORA_PIPE_LLAMA_CPP) or from
``qlora-pipe setup-gguf``, which keeps the one vendored in llama-cpp-python's source release (PyPI).
The result is read back with the ``gguf`` library and compared tensor by tensor with the merged weights.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from qlora_pipe.compat.llama_cpp import MEMORY_LINE, VERIFIED
from qlora_pipe.errors import UserError
from qlora_pipe.machine.user_cache import cache_home, locked, writable_folder

CONVERTER_TYPES = ("f16", "bf16", "q8_0", "f32")
# llama.cpp's quantizer (llama_model_quantize), from an f16 GGUF: the name -> llama_cpp's LLAMA_FTYPE_* constant.
K_QUANTS = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
GGUF_TYPES = (*CONVERTER_TYPES, *K_QUANTS)
EXTRA_HINT = "pip install -e '.[gguf]'"
SOURCE_PACKAGE = f"llama-cpp-python=={VERIFIED['llama-cpp-python']}"
ENV_CONVERTER = "QLORA_PIPE_LLAMA_CPP"


def cache_dir() -> Path:
    return cache_home() / f"llama.cpp-{VERIFIED['llama-cpp-python']}"


def check_gguf_type(gguf_type: str) -> None:
    """Before any work: the type is known, the gguf extra and (for k-quants) llama.cpp's quantizer exist."""
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"export --gguf-type {gguf_type}: choose one of {', '.join(GGUF_TYPES)}")
    for module in ("gguf", "sentencepiece"):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"export --format gguf: needs the gguf extra ({module} is missing): {EXTRA_HINT}")
    if gguf_type in K_QUANTS and importlib.util.find_spec("llama_cpp") is None:
        raise UserError(
            f"export --gguf-type {gguf_type}: k-quants need llama.cpp's quantizer: pip install {SOURCE_PACKAGE} "
            "(it builds llama.cpp), or choose f16, bf16 or q8_0"
        )
    converter_dir()


SCRIPTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")  # a model, and a PEFT LoRA adapter


def lora_converter_dir() -> Path:
    """The converter folder, with llama.cpp's LoRA converter (a setup before it was kept lacks it)."""
    where = converter_dir()
    if not (where / "convert_lora_to_gguf.py").is_file():
        raise UserError(
            f"export --unmerged --format gguf: {where} has no convert_lora_to_gguf.py; "
            + (
                "use a llama.cpp checkout that has it"
                if os.environ.get(ENV_CONVERTER)
                else "run `qlora-pipe setup-gguf`"
            )
        )
    return where


def converter_dir() -> Path:
    """llama.cpp's converter: QLORA_PIPE_LLAMA_CPP (a llama.cpp checkout), else the setup-gguf cache."""
    configured = os.environ.get(ENV_CONVERTER)
    where = Path(configured) if configured else cache_dir()
    if (where / "convert_hf_to_gguf.py").is_file():
        return where
    if configured:
        raise UserError(f"{ENV_CONVERTER}={configured}: no convert_hf_to_gguf.py there (a llama.cpp checkout?)")
    raise UserError(
        "export --format gguf: llama.cpp's converter is not set up; run `qlora-pipe setup-gguf` once "
        f"(keeps the converter of {SOURCE_PACKAGE}'s source release from PyPI) or set {ENV_CONVERTER}"
    )


def setup_converter() -> Path:
    """Download llama-cpp-python's source release with pip and keep its llama.cpp converter (and only that).
    Two setups at once (two shells, parallel test workers) take turns on a lock: the second finds it done."""
    target = cache_dir()
    if all((target / script).is_file() for script in SCRIPTS):
        print(f"llama.cpp's converter is already set up: {target}")
        return target
    writable_folder(target.parent, "setup-gguf")  # before the download
    with locked(target.with_name(target.name + ".lock"), "setup-gguf: waiting for another setup to finish"):
        if all((target / script).is_file() for script in SCRIPTS):
            print(f"llama.cpp's converter: {target}")
            return target
        _download_converter(target)
    print(f"llama.cpp's converter: {target}")
    return target


def _download_converter(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading {SOURCE_PACKAGE} (source, about 75 MB) with pip ...", flush=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp]
        done = subprocess.run([*command, SOURCE_PACKAGE], capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"setup-gguf: pip could not download {SOURCE_PACKAGE}: {done.stderr.strip()[-300:]}")
        archive = next(Path(tmp).glob("*.tar.gz"))
        partial = target.with_name(target.name + ".partial")
        with tarfile.open(archive) as tar:
            prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            keep = (*SCRIPTS, "conversion/", "gguf-py/", "LICENSE")
            members = [m for m in tar.getmembers() if m.name.startswith(tuple(prefix + k for k in keep))]
            for member in members:
                member.name = member.name[len(prefix) :]
            shutil.rmtree(partial, ignore_errors=True)  # ours: an extraction that was interrupted
            tar.extractall(partial, members=members, filter="data")
        if target.is_dir():  # ours: a setup from before the LoRA converter was kept
            shutil.rmtree(target)
        partial.rename(target)


def convert(merged: Path, out_file: Path, gguf_type: str, log: Path, mmproj: bool = False) -> dict | None:
    """Run the converter (in its own process) on the merged folder; a one-line error if it fails. Returns the
    converter process's peak host memory (qlora_pipe/machine/host_memory.py), None where not measured.
    ``mmproj``: a vision-language model's vision encoder and projector, in their own file."""
    converter_type = gguf_type if gguf_type in CONVERTER_TYPES else "f16"
    target = out_file if gguf_type in CONVERTER_TYPES else out_file.with_suffix(".f16.tmp")
    command = [sys.executable, "-m", "qlora_pipe.export.converter_process", *(["mmproj"] if mmproj else [])]
    command += [str(converter_dir()), str(merged)]
    # The output comes through a pipe and is written to the log afterwards: on a full disk the log cannot
    # be written either, and the reason must still reach the error line.
    done = subprocess.run(
        [*command, str(target), converter_type], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    where = keep_log(log, done.stdout)
    if done.returncode != 0:
        reason = conversion_failure(done.stdout, done.returncode, target.parent)  # before the space is freed
        target.unlink(missing_ok=True)
        raise UserError(f"export --format gguf: the conversion failed: {reason} ({where})")
    if target != out_file:
        try:
            quantize(target, out_file, gguf_type)
        finally:
            target.unlink(missing_ok=True)
    return converter_memory(done.stdout)


def converter_memory(output: str) -> dict | None:
    """The peak host memory the converter's process reported on its last line (compat/llama_cpp.py)."""
    import json

    for line in reversed(output.splitlines()):
        if line.startswith(MEMORY_LINE):
            try:
                return json.loads(line[len(MEMORY_LINE) :])
            except ValueError:
                return None
    return None


def keep_log(log: Path, output: str) -> str:
    """Write the converter's output to its log, best effort; where to read it, or why it is not there."""
    try:
        log.write_text(output, errors="replace")
    except OSError as exc:
        log.unlink(missing_ok=True)  # ours, cut short
        return f"log not written: {exc.strerror or exc}"
    return f"log: {log}"


def conversion_failure(output: str, returncode: int, folder: Path) -> str:
    """The converter's reason in one line: a full disk named as such (its traceback ends in an OSError
    deep in numpy or the gguf writer), else its last gguf: line or last line, else how it ended."""
    lines = [line for line in output.splitlines() if line.strip() and not PROGRESS.search(line)]
    if any(NO_SPACE in line for line in lines) or free_bytes(folder) < LOW_SPACE:
        return disk_full(folder)  # the half-written file still fills the disk here: it is removed afterwards
    if returncode < 0:
        return f"the converter was killed by signal {signal.Signals(-returncode).name} (out of memory?)"
    reason = next((line for line in reversed(lines) if line.startswith("gguf:")), lines[-1] if lines else "")
    if "tokenizer.model" in reason:
        return (
            "llama.cpp's converter reads this architecture's vocabulary from a SentencePiece tokenizer.model, "
            "which the model does not have"
        )
    if reason:
        return reason.removeprefix("gguf: ")
    return f"the converter exited with code {returncode} and printed nothing"


PROGRESS = re.compile(r"\d+%\|")  # a progress bar's line ("Writing:  79%|███ | 5.59G/7.11G"): never the reason
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device", as OSError prints it
LOW_SPACE = 64 * 2**20  # with no output at all, this little free space is the likely cause


def free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return LOW_SPACE


def disk_full(folder: Path) -> str:
    return f"no space left on the device holding {folder} ({free_bytes(folder) / 2**20:.0f} MiB free); free some space"


def quantize(source: Path, out_file: Path, gguf_type: str) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[gguf_type])
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out_file).encode(), ctypes.byref(params))
    if code != 0:
        out_file.unlink(missing_ok=True)
        space = f": {disk_full(out_file.parent)}" if free_bytes(out_file.parent) < LOW_SPACE else ""
        raise UserError(f"export --gguf-type {gguf_type}: llama.cpp's quantizer failed (code {code}){space}")
