"""`qlora-pipe export --format gguf`: the merged folder -> RUN/gguf/<run>-<type>.gguf, checked, with a Modelfile.

The GGUF is written under a temporary name and gets its final one only after its tensors and metadata
passed the check (qlora_pipe/export/gguf_check.py); with llama-cpp-python installed, llama.cpp's own
logits and greedy answers are compared with the trained model too. The results join the merged
folder's fidelity.json under "gguf".
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.export.gguf import convert
from qlora_pipe.export.gguf_check import check_gguf
from qlora_pipe.machine.host_memory import HostMemory
from qlora_pipe.runs import RunDir, training_system_prompt, write_json_atomic

log = logging.getLogger(__name__)

GGUF_MARKER = ".qlora-pipe-gguf"


def gguf_folder(run: RunDir) -> Path:
    """RUN/gguf, created with a marker; an existing folder without it is the user's and refused."""
    folder = run.root / "gguf"
    if folder.exists() and any(folder.iterdir()) and not (folder / GGUF_MARKER).is_file():
        raise UserError(f"export --format gguf: {folder} holds files qlora-pipe did not write; move them first")
    folder.mkdir(exist_ok=True)
    (folder / GGUF_MARKER).write_text("GGUF files written by qlora-pipe export --format gguf\n")
    return folder


def _tokens(merged: Path) -> tuple[str, str]:
    config = json.loads((merged / "tokenizer_config.json").read_text(encoding="utf-8"))

    def text(value) -> str:
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    return text(config.get("bos_token")), text(config.get("eos_token"))


def tool_parts_trained(run: RunDir) -> str:
    """'tool calls' / 'reasoning' / both when the run's data had them (data_report.json), else ''."""
    try:
        reports = json.loads(run.data_report.read_text())
    except (OSError, ValueError):
        return ""
    parts = {key for report in reports for key, n in report.get("conversation_parts", {}).items() if n}
    found = ["tool calls"] if "rows_with_tool_calls" in parts else []
    found += ["reasoning"] if parts & {"reasoning_trained", "reasoning_masked"} else []
    return " and ".join(found)


def write_ollama_modelfile(
    run: RunDir, merged: Path, folder: Path, gguf_file: Path, adapter: Path | None = None
) -> dict[str, Any]:
    """The Modelfile (``adapter``: a LoRA GGUF served on ``gguf_file``), or why none was written (a template
    it cannot translate is not an error)."""
    import gguf

    from qlora_pipe.export.ollama import modelfile, write_modelfile

    template_file = merged / "chat_template.jinja"
    if not template_file.is_file():
        return {"written": False, "reason": "the merged folder has no chat template"}
    trained_on = tool_parts_trained(run)
    if trained_on:
        reason = (
            f"ollama: the run trained on {trained_on}, which the Modelfile's TEMPLATE cannot render; no Modelfile "
            "was written (serve with llama.cpp, which reads the chat template from the GGUF, or write TEMPLATE by hand)"
        )
        log.warning("%s", reason)
        (folder / "Modelfile").unlink(missing_ok=True)  # ours (the folder's marker): never a stale template
        return {"written": False, "reason": reason}
    reader = gguf.GGUFReader(gguf_file)
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    add_bos = bool(field.contents()) if field is not None else False
    bos, eos = _tokens(merged)
    generation = json.loads((merged / "generation_config.json").read_text())
    try:
        text = modelfile(
            gguf_file.name,
            template_file.read_text(encoding="utf-8"),
            bos,
            eos,
            training_system_prompt(run),
            generation,
            add_bos,
            adapter.name if adapter else None,
        )
    except UserError as exc:
        log.warning("%s", exc)
        (folder / "Modelfile").unlink(missing_ok=True)  # ours (the folder's marker): never a stale template
        return {"written": False, "reason": str(exc)}
    return {"written": True, "path": str(write_modelfile(folder, text))}


def export_gguf(run: RunDir, merged: Path, gguf_type: str) -> dict[str, Any]:
    """Convert, check, compare at runtime when llama.cpp is importable, and write the Modelfile."""
    import importlib.util

    folder = gguf_folder(run)
    final = folder / f"{run.root.name}-{gguf_type}.gguf"
    partial = final.with_name(final.name + ".partial")
    print(f"converting {merged} to GGUF ({gguf_type}) with llama.cpp's converter ...", flush=True)
    started = time.perf_counter()
    converter_memory = convert(merged, partial, gguf_type, folder / f"convert-{gguf_type}.log")
    converted = time.perf_counter()
    try:
        with HostMemory() as check_memory:
            result = check_gguf(merged, partial, gguf_type)
        result["file"] = final.name
        checked = time.perf_counter()
        result["seconds"] = {"convert": round(converted - started, 1), "check": round(checked - converted, 1)}
        # Host memory of the two steps (the converter runs in its own process); None where not measured
        result["host_memory"] = {"converter": converter_memory, "check": check_memory.report()}
        if not result["passed"]:
            raise UserError(f"export --format gguf: the GGUF does not match the merged model: {failure(result)}")
        if importlib.util.find_spec("llama_cpp") is not None:
            from qlora_pipe.export.gguf_runtime import compare_runtime

            result["llama_cpp"] = compare_runtime(run, partial)
            if "failed" in result["llama_cpp"]:  # the file checked out; the runtime on this machine did not
                log.warning("export --format gguf: %s", result["llama_cpp"]["failed"])
        else:
            result["llama_cpp"] = {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    except BaseException:
        partial.unlink(missing_ok=True)  # ours: written a moment ago under the temporary name
        raise
    partial.replace(final)
    if (merged / "processor_config.json").is_file():  # a vision-language model: its projector file beside
        result["mmproj"] = export_projector(run, merged, folder)
    result["ollama_modelfile"] = write_ollama_modelfile(run, merged, folder, final)
    record(merged, gguf_type, result)
    return result


def export_projector(run: RunDir, merged: Path, folder: Path) -> dict[str, Any]:
    """RUN/gguf/<run>-mmproj-f16.gguf: the vision encoder and projector as llama.cpp's multimodal tools load
    them (--mmproj), converted by llama.cpp's converter and checked tensor by tensor like the main file."""
    final = folder / f"{run.root.name}-mmproj-f16.gguf"
    partial = final.with_name(final.name + ".partial")
    print(f"converting the vision encoder and projector of {merged} to GGUF (mmproj, f16) ...", flush=True)
    convert(merged, partial, "f16", folder / "convert-mmproj.log", mmproj=True)
    try:
        result = check_gguf(merged, partial, "f16", mmproj=True)
        if not result["passed"]:
            raise UserError(f"export --format gguf: the mmproj file does not match the merged model: {failure(result)}")
    except BaseException:
        partial.unlink(missing_ok=True)  # ours: written a moment ago under the temporary name
        raise
    partial.replace(final)
    result["file"] = final.name
    return result


def failure(result: dict[str, Any]) -> str:
    if result["unmatched_tensors"]:
        return f"tensors with no merged source: {', '.join(result['unmatched_tensors'][:5])}"
    if result.get("non_finite_tensors"):
        return f"tensors holding NaN or infinite values: {', '.join(result['non_finite_tensors'][:5])}"
    if result["max_abs_diff_exact_tensors"]:
        return f"16/32-bit tensors differ by up to {result['max_abs_diff_exact_tensors']:.3g}"
    if result["eos_token_id"] != result["end_of_turn_token_id"]:
        return (
            f"end of sequence is token {result['eos_token_id']}, not the end of turn {result['end_of_turn_token_id']}"
        )
    if not result["chat_template_is_serving_template"]:
        return "the chat template in the file is not the merged folder's serving template"
    return f"quantization error {result['max_relative_quantization_error']:.3g} above {result['criteria']}"


def record(merged: Path, gguf_type: str, result: dict[str, Any]) -> None:
    path = merged / "fidelity.json"
    fidelity = json.loads(path.read_text()) if path.is_file() else {}
    fidelity.setdefault("gguf", {})[gguf_type] = result
    write_json_atomic(path, fidelity)


def gguf_table(result: dict[str, Any]) -> str:
    runtime = result.get("llama_cpp", {})
    lines = [
        f"GGUF {result['type']}: {result['file']} ({result['bytes'] / 2**20:.1f} MiB), {result['tensors']} tensors "
        f"({result['exact_tensors']} bit-equal to the merged weights, {result['quantized_tensors']} quantized, "
        f"largest error {100 * result['max_relative_quantization_error']:.2f}% of a tensor's largest weight)",
        f"  end of sequence: token {result['eos_token_id']} (end of turn); chat template: the serving template",
    ]
    if "top1_agreement" in runtime:
        lines.append(
            f"  llama.cpp vs the trained model: max |Δlogit| {runtime['max_abs_logit_diff']:.3f}, top-1 agreement "
            f"{100 * runtime['top1_agreement']:.1f}%, greedy answers identical {runtime['greedy_identical']}"
        )
    else:
        lines.append(f"  llama.cpp runtime check: {runtime.get('skipped') or runtime.get('failed', 'not run')}")
    memory = result.get("host_memory") or {}
    peaks = {step: report for step, report in memory.items() if report}
    if peaks:
        lines.append(
            "  host memory: "
            + ", ".join(
                f"{step} peak {report['peak_anonymous_bytes'] / 2**30:.2f} GiB anonymous "
                f"(+{report['peak_file_mapped_bytes'] / 2**30:.2f} GiB memory-mapped files)"
                for step, report in peaks.items()
            )
        )
    if projector := result.get("mmproj"):
        lines.append(
            f"  vision: {projector['file']} ({projector['bytes'] / 2**20:.1f} MiB), {projector['tensors']} tensors "
            f"of the vision encoder and projector, {projector['exact_tensors']} bit-equal to the merged weights "
            "(llama.cpp: llama-mtmd-cli -m MODEL.gguf --mmproj THIS_FILE)"
        )
    modelfile = result.get("ollama_modelfile", {})
    lines.append(f"  Ollama: {modelfile.get('path') or 'no Modelfile: ' + modelfile.get('reason', '')}")
    return "\n".join(lines)
