"""Is the GGUF the merged model? Its tensors read back with the ``gguf`` library, beside the merged weights.

Every tensor of the file is matched to its merged tensor by the gguf library's own name map (and the
converter's q/k row order for Llama-family models, qlora_pipe/compat/llama_cpp.py). 16- and 32-bit
tensors must be equal to the merged weights rounded to the file's type (bit for bit); quantized ones
within the type's rounding, relative to the tensor's largest weight. The metadata must name the
end-of-turn token as end of sequence and carry the merged folder's serving chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_pipe.compat.llama_cpp import (
    NORM_SHIFTED_ARCHITECTURES,
    PERMUTED_ARCHITECTURES,
    TRANSPOSED_WEIGHTS,
    permute_rows,
)
from qlora_pipe.finite import within, worst

# Largest |dequantized - merged| / max|merged| per tensor: half a quantization step of the type at its
# coarsest block, with margin (q8_0: 1/254 of the block's largest weight; k-quants: 6-bit scales too).
# Measured on the quickstart model: q8_0 0.40%, q4_k_m 7.7%.
QUANT_TOLERANCE = {"q8_0": 0.005, "q6_k": 0.03, "q5_k_m": 0.06, "q4_k_m": 0.12, "q4_k_s": 0.12}
EXACT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def merged_tensors(merged: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(merged.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def gguf_name_map(reader, blocks: int):
    import gguf

    arch_name = reader.fields["general.architecture"].contents()
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    return gguf.get_tensor_name_map(arch, blocks)


def expected_tensor(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """The merged tensor as the converter lays it out."""
    architecture = (config.get("architectures") or [""])[0]
    if architecture in PERMUTED_ARCHITECTURES and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config["num_attention_heads"]
        kv = heads if name.endswith("q_proj.weight") else config.get("num_key_value_heads", heads)
        return torch.from_numpy(permute_rows(tensor.float().numpy(), heads, kv))
    if name.endswith(TRANSPOSED_WEIGHTS.get(architecture, ())):
        return tensor.T
    if architecture in NORM_SHIFTED_ARCHITECTURES and name.endswith("norm.weight"):
        return tensor.float() + 1  # the converter widens 16-bit tensors to fp32 before the shift
    return tensor


def check_gguf(merged: Path, gguf_file: Path, gguf_type: str) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    config = json.loads((merged / "config.json").read_text())
    names = gguf_name_map(reader, config.get("num_hidden_layers", config.get("n_layer", 0)))
    sources = merged_tensors(merged)
    by_gguf_name = {}
    for hf_name, tensor in sources.items():
        mapped = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            by_gguf_name[mapped] = (hf_name, tensor)
    if "output.weight" not in by_gguf_name and "token_embd.weight" in by_gguf_name:
        by_gguf_name["output.weight"] = by_gguf_name["token_embd.weight"]  # tied embeddings
    exact_diff, quant_error, unmatched, exact, quantized = 0.0, 0.0, [], 0, 0
    non_finite = []  # tensors holding a NaN or an infinity: named, and the check fails
    for tensor in reader.tensors:
        if tensor.name not in by_gguf_name:
            unmatched.append(tensor.name)
            continue
        hf_name, source = by_gguf_name[tensor.name]
        want = expected_tensor(hf_name, source, config).float()
        got = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), copy=True))
        if got.shape != want.shape:
            unmatched.append(f"{tensor.name} (shape {tuple(got.shape)}, merged {tuple(want.shape)})")
            continue
        if not bool(torch.isfinite(got).all()):
            non_finite.append(tensor.name)
        kind = tensor.tensor_type.name
        if kind in EXACT_TYPES:
            exact += 1
            exact_diff = worst(exact_diff, (got - want.to(EXACT_TYPES[kind]).float()).abs().max().item())
        else:
            quantized += 1
            scale = want.abs().max().item() or 1.0
            quant_error = worst(quant_error, (got - want).abs().max().item() / scale)
    eos = reader.fields.get("tokenizer.ggml.eos_token_id")
    template = reader.fields.get("tokenizer.chat_template")
    serving = (
        (merged / "chat_template.jinja").read_text(encoding="utf-8")
        if (merged / "chat_template.jinja").is_file()
        else None
    )
    end_of_turn = end_of_turn_id(merged)
    result = {
        "type": gguf_type,
        "file": gguf_file.name,
        "bytes": gguf_file.stat().st_size,
        "tensors": len(reader.tensors),
        "exact_tensors": exact,
        "quantized_tensors": quantized,
        "unmatched_tensors": unmatched,
        "non_finite_tensors": non_finite,
        "max_abs_diff_exact_tensors": exact_diff,
        "max_relative_quantization_error": quant_error,
        "eos_token_id": int(eos.contents()) if eos else None,
        "end_of_turn_token_id": end_of_turn,
        "chat_template_is_serving_template": template is not None and template.contents() == serving,
    }
    tolerance = QUANT_TOLERANCE.get(gguf_type, 0.0)
    result["passed"] = (
        not unmatched
        and not non_finite
        and exact_diff == 0.0
        and within(quant_error, tolerance)
        and result["eos_token_id"] == end_of_turn
        and (serving is None or result["chat_template_is_serving_template"])
    )
    result["criteria"] = {"exact_tensors": "bit-equal", "max_relative_quantization_error": tolerance}
    return result


def end_of_turn_id(merged: Path) -> int | None:
    """The first eos id of the merged generation config: the end-of-turn token the model was trained on."""
    path = merged / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    return eos[0] if isinstance(eos, list) else eos
