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


# Tensors are compared in blocks of rows of at most this many elements (8 MiB in fp32 for each side), so the
# check never holds a whole fp32 copy of a large tensor (a 7B's embedding: 2 GiB each for file and merged).
BLOCK_ELEMENTS = 2 * 1024 * 1024


class MergedWeights:
    """The merged folder's tensors by name, each read (memory-mapped) only when it is compared."""

    def __init__(self, merged: Path) -> None:
        from safetensors import safe_open

        self._files = [safe_open(shard, framework="pt") for shard in sorted(merged.glob("*.safetensors"))]
        self._where = {name: handle for handle in self._files for name in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)

    def names(self) -> list[str]:
        return list(self._where)

    def whole(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._where[name].get_slice(name)[start:stop]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())


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


def laid_out_as_stored(name: str, config: dict[str, Any]) -> bool:
    """Whether the converter writes this merged tensor's rows unchanged (so it can be compared row block by row
    block); permuted and transposed ones (at most hidden x intermediate) are compared whole."""
    architecture = (config.get("architectures") or [""])[0]
    permuted = architecture in PERMUTED_ARCHITECTURES and name.endswith(("q_proj.weight", "k_proj.weight"))
    shifted = architecture in NORM_SHIFTED_ARCHITECTURES and name.endswith("norm.weight")
    return not (permuted or shifted or name.endswith(TRANSPOSED_WEIGHTS.get(architecture, ())))


def compared_blocks(tensor, hf_name: str, weights: MergedWeights, config: dict[str, Any]):
    """(file's block dequantized, merged block as the converter lays it out), fp32, over the tensor's rows."""
    import gguf

    rows = tensor.data.shape[0] if tensor.data.ndim > 1 else 0
    if not rows or not laid_out_as_stored(hf_name, config):
        want = expected_tensor(hf_name, weights.whole(hf_name), config).float()
        got = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), copy=True))
        yield got, want
        return
    step = max(1, BLOCK_ELEMENTS // max(1, int(tensor.n_elements) // rows))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        got = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data[start:stop], tensor.tensor_type)))
        yield got, weights.rows(hf_name, start, stop).float()


def converted_config(config: dict[str, Any], mmproj: bool) -> dict[str, Any]:
    """The part of the merged config a file holds: a vision-language model's language model (its text_config)
    in the main file, its vision encoder (vision_config, laid out as stored) in the mmproj file."""
    if mmproj:
        return {**config.get("vision_config", {}), "architectures": []}
    text = config.get("text_config")
    if not text:
        return config
    return {**text, "architectures": text.get("architectures") or config.get("architectures")}


# Where a vision-language model keeps its language model; the converter writes it under the plain names.
LANGUAGE_PREFIXES = (".text_model.", ".language_model.")


def mapped_name(names, hf_name: str) -> str | None:
    found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    for prefix in LANGUAGE_PREFIXES:
        if found is None and prefix in hf_name:
            found = names.get_name(hf_name.replace(prefix, ".", 1), try_suffixes=(".weight", ".bias"))
    return found


def check_gguf(merged: Path, gguf_file: Path, gguf_type: str, mmproj: bool = False) -> dict[str, Any]:
    """The file against the merged folder (``mmproj``: a vision-language model's projector file, whose
    tensors are the vision encoder's and the projector's)."""
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    config = converted_config(json.loads((merged / "config.json").read_text()), mmproj)
    names = gguf_name_map(reader, config.get("num_hidden_layers", config.get("n_layer", 0)))
    weights = MergedWeights(merged)
    by_gguf_name = {}
    for hf_name in weights.names():
        mapped = mapped_name(names, hf_name)
        if mapped is not None:
            by_gguf_name[mapped] = hf_name
    if "output.weight" not in by_gguf_name and "token_embd.weight" in by_gguf_name:
        by_gguf_name["output.weight"] = by_gguf_name["token_embd.weight"]  # tied embeddings
    exact_diff, quant_error, unmatched, exact, quantized = 0.0, 0.0, [], 0, 0
    non_finite = []  # tensors holding a NaN or an infinity: named, and the check fails
    for tensor in reader.tensors:
        if tensor.name not in by_gguf_name:
            unmatched.append(tensor.name)
            continue
        hf_name = by_gguf_name[tensor.name]
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if laid_out_as_stored(hf_name, config) and shape != weights.shape(hf_name):
            unmatched.append(f"{tensor.name} (shape {shape}, merged {weights.shape(hf_name)})")
            continue
        kind = tensor.tensor_type.name
        diff, largest, finite, mismatch = 0.0, 0.0, True, False
        for got, want in compared_blocks(tensor, hf_name, weights, config):
            if got.shape != want.shape:
                unmatched.append(f"{tensor.name} (shape {tuple(got.shape)}, merged {tuple(want.shape)})")
                mismatch = True
                break
            finite = finite and bool(torch.isfinite(got).all())
            if kind in EXACT_TYPES:
                diff = worst(diff, (got - want.to(EXACT_TYPES[kind]).float()).abs().max().item())
            else:
                diff = worst(diff, (got - want).abs().max().item())
                largest = worst(largest, want.abs().max().item())
        if mismatch:
            continue
        if not finite:
            non_finite.append(tensor.name)
        if kind in EXACT_TYPES:
            exact += 1
            exact_diff = worst(exact_diff, diff)
        else:
            quantized += 1
            quant_error = worst(quant_error, diff / (largest or 1.0))
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
        and (mmproj or result["eos_token_id"] == end_of_turn)
        and (mmproj or serving is None or result["chat_template_is_serving_template"])
    )
    result["criteria"] = {"exact_tensors": "bit-equal", "max_relative_quantization_error": tolerance}
    return result


def end_of_turn_id(merged: Path) -> int | None:
    """The first eos id of the merged generation config: the end-of-turn token the model was trained on."""
    path = merged / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    return eos[0] if isinstance(eos, list) else eos
