"""The input embedding kept in its stored 16-bit dtype when the compute dtype is fp32.

On a CPU without native bf16 the whole model computes in fp32, and transformers loads every weight
that stays out of 4-bit in that dtype: for an untied 152k-vocabulary 7B, 2.03 GiB for the input
embedding alone. The embedding is only a lookup, so it can stay in the checkpoint's 16-bit dtype and
its output be cast to fp32 afterwards. A local safetensors checkpoint that stores it in 16 bits has it read
in that dtype (``stored_embedding_dtypes`` before the load: no fp32 copy exists even while loading); any other
is kept in 16 bits after the load when every value is representable there, which is checked value by value
before anything changes; otherwise the weight stays fp32.

Left alone: tied embeddings (the same weight is the output layer's matrix, a matmul, not a lookup),
embeddings with their own forward (Gemma scales the looked-up rows in the weight's dtype), embeddings
trained in full (``lora.modules_to_save``), and sharded launches (FSDP wants one dtype per unit).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

ROWS_PER_CHECK = 4096  # rows compared at a time: the check never holds a second copy of the weight


def _exactly_representable(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    for start in range(0, weight.shape[0], ROWS_PER_CHECK):
        rows = weight[start : start + ROWS_PER_CHECK]
        if not torch.equal(rows, rows.to(dtype).to(weight.dtype)):
            return False
    return True


def _output_in_float32(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(torch.float32)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next((name for name, candidate in model.named_modules() if candidate is module), "")


def _lookup_embedding(model: nn.Module, trained_in_full: list[str]) -> nn.Embedding | None:
    """The model's input embedding if it is a plain, untied lookup that is not trained in full."""
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding:
        return None
    output = model.get_output_embeddings()
    if output is not None and getattr(output, "weight", None) is embedding.weight:
        return None
    name = _module_name(model, embedding)
    if any(name == kept or name.endswith("." + kept) for kept in trained_in_full):
        return None
    return embedding


def _stored_dtype(folder: Path, name: str) -> str | None:
    """The dtype a local safetensors checkpoint stores tensor ``name`` in ("BF16", ...), or None."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    try:
        shard = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
        with safe_open(folder / shard, framework="pt") as reader:
            return reader.get_slice(name).get_dtype() if name in set(reader.keys()) else None
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        return None


def stored_embedding_dtypes(location: str, trained_in_full: list[str]) -> dict[str, torch.dtype]:
    """For a local safetensors checkpoint whose plain, untied input embedding is stored in 16 bits: that weight's
    name and dtype, for the load to read it so (compat/transformers.py's tensors_loaded_as); else nothing."""
    folder = Path(location)
    if not (folder / "config.json").is_file():
        return {}
    from transformers import AutoConfig, AutoModelForCausalLM

    from accelerate import init_empty_weights

    try:
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError):  # remote code, an unknown architecture: the load says so itself
        return {}
    if getattr(config.get_text_config(), "tie_word_embeddings", False):  # tied only once loaded (GPT-2)
        return {}
    embedding = _lookup_embedding(skeleton, trained_in_full)
    if embedding is None:
        return {}
    name = next(n for n, p in skeleton.named_parameters() if p is embedding.weight)
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(_stored_dtype(folder, name) or "")
    return {name: dtype} if dtype is not None else {}


def keep_input_embedding_stored(model: nn.Module, trained_in_full: list[str]) -> torch.dtype | None:
    """Keep the input embedding of an fp32 model in 16 bits where that loses nothing (already so when it was
    read in its stored 16-bit dtype); the dtype kept, or None."""
    embedding = _lookup_embedding(model, trained_in_full)
    if embedding is None or embedding.weight.device.type == "meta":
        return None
    if embedding.weight.dtype in (torch.bfloat16, torch.float16):  # read as stored (stored_embedding_dtypes)
        embedding.register_forward_hook(_output_in_float32)
        return embedding.weight.dtype
    if embedding.weight.dtype != torch.float32:
        return None
    for dtype in (torch.bfloat16, torch.float16):
        if _exactly_representable(embedding.weight.data, dtype):
            embedding.weight = nn.Parameter(embedding.weight.data.to(dtype), requires_grad=False)
            embedding.register_forward_hook(_output_in_float32)
            return dtype
    return None
