"""The unmerged export as GGUF: the dequantized base and the adapter as a LoRA GGUF, for llama.cpp and Ollama.

llama.cpp applies a LoRA GGUF at load time (``llama-server -m base.gguf --lora adapter.gguf``; Ollama's
``ADAPTER``), adding ``alpha / rank * lora_b @ lora_a`` to each weight in the compute, so the delta is never
rounded into a 16-bit weight. The base file is converted from the unmerged base folder (the NF4 weights the
adapter was trained against) and checked like a merged GGUF; the adapter file comes from llama.cpp's
``convert_lora_to_gguf.py`` (qlora_pipe/compat/llama_cpp.py) and is checked by rebuilding every delta from
the file (its own alpha, rank, lora_a and lora_b) against the trained adapter's, in the converter's layout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_pipe.compat.llama_cpp import lora_alpha_for_llama_cpp
from qlora_pipe.errors import UserError
from qlora_pipe.export.gguf import conversion_failure, convert, keep_log, lora_converter_dir
from qlora_pipe.export.gguf_check import check_gguf, expected_tensor, gguf_name_map
from qlora_pipe.export.merge import ADAPTER_PREFIX
from qlora_pipe.finite import within, worst
from qlora_pipe.runs import RunDir

LORA_TYPE = "f32"  # the adapter is small: kept in fp32, exactly as trained
LORA_TOLERANCE = 1e-5  # largest |rebuilt - trained delta| relative to the delta's largest entry (fp32 products)


def lora_refusal(config: dict[str, Any], replaced: list[str]) -> str | None:
    """Why llama.cpp cannot apply this adapter as trained (``replaced``: its fully trained modules), or None."""
    if config.get("use_dora"):
        return "a DoRA adapter (llama.cpp's LoRA applies no magnitude vector)"
    if config.get("fan_in_fan_out"):
        return "Conv1D layers (GPT-2): llama.cpp's LoRA converter lays their delta out transposed"
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        return "per-module ranks or alphas (the LoRA GGUF has one alpha)"
    if replaced:
        return f"fully trained modules (modules_to_save: {replaced[0]})"
    return None


def convert_lora(adapter: Path, base: Path, out_file: Path, log: Path) -> None:
    """llama.cpp's LoRA converter on a copy of the adapter whose alpha gives llama.cpp the trained scale."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp)
        shutil.copy(adapter / "adapter_model.safetensors", source / "adapter_model.safetensors")
        config = {**config, "lora_alpha": lora_alpha_for_llama_cpp(config), "use_rslora": False}
        (source / "adapter_config.json").write_text(json.dumps(config, indent=2))
        command = [sys.executable, "-m", "qlora_pipe.export.converter_process", "lora", str(lora_converter_dir())]
        done = subprocess.run(
            [*command, str(source), str(base), str(out_file), LORA_TYPE],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    where = keep_log(log, done.stdout)
    if done.returncode != 0:
        reason = conversion_failure(done.stdout, done.returncode, out_file.parent)  # before the space is freed
        out_file.unlink(missing_ok=True)
        raise UserError(f"export --unmerged --format gguf: the LoRA conversion failed: {reason} ({where})")


def check_lora_gguf(adapter: Path, base: Path, lora_file: Path) -> dict[str, Any]:
    """Every adapted weight's delta rebuilt from the LoRA GGUF (its alpha / rank * lora_b @ lora_a) against the
    trained delta (scale * B @ A) laid out as the converter lays out the weight; every pair present."""
    import gguf
    from safetensors.torch import load_file

    reader = gguf.GGUFReader(lora_file)
    config = json.loads((base / "config.json").read_text())
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    names = gguf_name_map(reader, config.get("num_hidden_layers", config.get("n_layer", 0)))
    tensors = load_file(adapter / "adapter_model.safetensors")
    stored = {t.name: t for t in reader.tensors}
    alpha_field = reader.fields.get("adapter.lora.alpha")
    alpha = float(alpha_field.contents()) if alpha_field is not None else None
    rank, trained_alpha = adapter_config["r"], adapter_config["lora_alpha"]
    scale = trained_alpha / (rank**0.5 if adapter_config.get("use_rslora") else rank)
    worst_error, missing, compared = 0.0, [], 0
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key.removeprefix(ADAPTER_PREFIX).removesuffix(".lora_A.weight")
        mapped = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        a_name, b_name = f"{mapped}.lora_a", f"{mapped}.lora_b"
        if mapped is None or a_name not in stored or b_name not in stored or alpha is None:
            missing.append(module)
            continue
        a, b = (_read(stored[name]) for name in (a_name, b_name))
        rebuilt = (alpha / b.shape[1]) * (b @ a)
        trained = scale * (tensors[key.replace("lora_A", "lora_B")].float() @ tensors[key].float())
        want = expected_tensor(f"{module}.weight", trained, config).float()
        if rebuilt.shape != want.shape:
            missing.append(f"{module} (shape {tuple(rebuilt.shape)}, trained {tuple(want.shape)})")
            continue
        largest = want.abs().max().item() or 1.0
        worst_error = worst(worst_error, (rebuilt - want).abs().max().item() / largest)
        compared += 1
    result = {
        "file": lora_file.name,
        "bytes": lora_file.stat().st_size,
        "alpha": alpha,
        "adapted_weights": compared,
        "missing": missing,
        "max_relative_delta_error": worst_error,
        "criteria": {"max_relative_delta_error": LORA_TOLERANCE},
    }
    result["passed"] = not missing and compared > 0 and within(worst_error, LORA_TOLERANCE)
    return result


def _read(tensor) -> torch.Tensor:
    import gguf

    return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), copy=True)).float()


def export_unmerged_gguf(run: RunDir, folder: Path, base_type: str) -> dict[str, Any]:
    """``folder``/gguf: the base GGUF (``base_type``) and the adapter's LoRA GGUF, both checked; the runtime
    comparison with llama-cpp-python installed; a Modelfile with FROM and ADAPTER."""
    import importlib.util

    from qlora_pipe.export.gguf import check_gguf_type
    from qlora_pipe.export.gguf_command import failure, write_ollama_modelfile

    check_gguf_type(base_type)
    base, adapter = folder / "base", folder / "adapter"
    out = folder / "gguf"
    out.mkdir(exist_ok=True)
    base_file = out / f"{run.root.name}-base-{base_type}.gguf"
    lora_file = out / f"{run.root.name}-lora-{LORA_TYPE}.gguf"
    print(f"converting {base} to GGUF ({base_type}) with llama.cpp's converter ...", flush=True)
    convert(base, base_file, base_type, out / f"convert-base-{base_type}.log")
    base_check = check_gguf(base, base_file, base_type)
    if not base_check["passed"]:
        raise UserError(
            f"export --unmerged --format gguf: the base GGUF does not match the base: {failure(base_check)}"
        )
    print(f"converting {adapter} to a LoRA GGUF ({LORA_TYPE}) with llama.cpp's LoRA converter ...", flush=True)
    convert_lora(adapter, base, lora_file, out / "convert-lora.log")
    lora_check = check_lora_gguf(adapter, base, lora_file)
    if not lora_check["passed"]:
        raise UserError(
            "export --unmerged --format gguf: the LoRA GGUF does not rebuild the trained delta "
            f"(missing {lora_check['missing'][:3]}, error {lora_check['max_relative_delta_error']:.3g})"
        )
    result: dict[str, Any] = {"base": base_check, "lora": lora_check}
    if importlib.util.find_spec("llama_cpp") is not None:
        from qlora_pipe.export.gguf_runtime import compare_runtime

        result["llama_cpp"] = compare_runtime(run, base_file, lora_file)
    else:
        result["llama_cpp"] = {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    result["ollama_modelfile"] = write_ollama_modelfile(run, base, out, base_file, lora_file)
    return result


def unmerged_gguf_table(result: dict[str, Any]) -> str:
    base, lora, runtime = result["base"], result["lora"], result.get("llama_cpp", {})
    lines = [
        f"GGUF base {base['type']}: {base['file']} ({base['bytes'] / 2**20:.1f} MiB), {base['exact_tensors']} tensors "
        f"bit-equal to the dequantized base, {base['quantized_tensors']} quantized",
        f"GGUF LoRA: {lora['file']} ({lora['bytes'] / 2**20:.2f} MiB), {lora['adapted_weights']} adapted weights, "
        f"alpha {lora['alpha']:g}; deltas rebuilt from the file within {lora['max_relative_delta_error']:.2g} "
        "of the trained ones",
    ]
    if "top1_agreement" in runtime:
        lines.append(
            "  llama.cpp (base + --lora) vs the trained model: "
            f"loss change {100 * runtime['relative_loss_change']:.3f}%, "
            f"mean |Δlogit| {100 * runtime['relative_logit_diff']:.2f}% of the mean logit, top-1 agreement "
            f"{100 * runtime['top1_agreement']:.1f}%, greedy answers identical {runtime['greedy_identical']}"
        )
    else:
        lines.append(f"  llama.cpp runtime check: {runtime.get('skipped') or runtime.get('failed', 'not run')}")
    modelfile = result.get("ollama_modelfile", {})
    lines.append(f"  Ollama: {modelfile.get('path') or 'no Modelfile: ' + modelfile.get('reason', '')}")
    return "\n".join(lines)
