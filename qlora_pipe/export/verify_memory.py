"""Does verification fit this machine? Decided before the merge starts, with the numbers.

Verification loads two models one after the other: the trained one (the 4-bit base as training loaded it,
plus the adapter; beside it, a copy computing in another dtype for the reference noise: fp32 for a 16-bit run,
bf16 for a bf16 export of an fp32 run)
and the merged one (plain transformers, in the dtype it is served in), with the trained model's logits kept
on disk in between (stored_logits.py). Its peak is the larger of the two stages plus a row's logits. Each term comes
from the files themselves: the parameter counts from the safetensors headers of the base, the 4-bit
layers from the same rule the export uses, the adapter from its file. A merged model that does not fit
whole is verified one decoder block at a time, read from its own files (streamed_model.py): its term is
then everything outside the blocks plus the largest block. When even that does not fit the memory
available (RAM on CPU: MemAvailable and any cgroup limit; free GPU memory on a GPU), the export stops
before writing anything, with every term, rather than swapping or being killed mid-way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError

GiB = 2**30
# NF4 with double quantization: 4 bits per weight, one 8-bit absmax per 64 weights, one fp32 absmax and
# offset per 256 of those (bitsandbytes' defaults); without double quantization an fp32 absmax per 64.
NF4_BYTES = {True: 0.5 + 1 / 64 + 8 / (64 * 256), False: 0.5 + 4 / 64}
LOGIT_COPIES = 6  # per model and row: the logits, their fp32 copy and the log-softmax; both models at once
HEADROOM = 1.10  # allocator slack and the libraries' working buffers
AVAILABLE_ENV = "QLORA_PIPE_AVAILABLE_MEMORY"  # e.g. "8GiB": what a container's /proc does not say


def available_memory(device: str) -> tuple[int, str]:
    """Bytes this process may still use, and where the figure comes from."""
    if os.environ.get(AVAILABLE_ENV):
        from qlora_pipe.sizes import parse_size

        return parse_size(os.environ[AVAILABLE_ENV], AVAILABLE_ENV), AVAILABLE_ENV
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0], "free GPU memory"
    from qlora_pipe.machine.host_memory import host_available

    return host_available()


def verification_need(
    recipe, base: Path, adapter: Path, quantized: set[str], served_dtype, max_row: int, blocks: list[str] = ()
):
    """Bytes verification holds at its peak, term by term (``served_dtype``: the merged model's, as loaded;
    ``blocks``: its decoder blocks, read one at a time when it does not fit whole)."""
    from qlora_pipe.export.merge import base_shards
    from qlora_pipe.export.streamed_model import streamed_bytes
    from qlora_pipe.export.tensor_files import TensorReader
    from qlora_pipe.models.loading import DTYPES

    q = recipe.quantization  # a run's recorded recipe: its dtypes settled when it trained
    compute = DTYPES[q.compute_dtype].itemsize
    trained, served = 0.0, {}
    for shard in base_shards(base):
        with TensorReader(shard) as reader:
            for name in reader.names():
                entry = reader.entry(name)
                count = entry.nbytes // entry.dtype.itemsize
                trained += count * NF4_BYTES[q.double_quant] if name in quantized else count * compute
                served[name] = count * served_dtype.itemsize if entry.dtype.is_floating_point else entry.nbytes
    vocab = json.loads((base / "config.json").read_text()).get("vocab_size", 0)
    return {
        TRAINED: int(trained) + (adapter.stat().st_size if adapter.is_file() else 0),
        MERGED: sum(served.values()),
        BLOCKWISE: streamed_bytes(served, list(blocks)),  # without blocks: the whole model
        LOGITS: LOGIT_COPIES * max_row * vocab * 4,
    }


TRAINED, MERGED, LOGITS = "trained model (4-bit base + adapter)", "merged model", "logits of one row"
BLOCKWISE = "merged model, one decoder block at a time"


def verification_peak(need: dict[str, int], noise_copy: bool, streamed: bool = False) -> int:
    """The larger stage (the trained model, twice when its noise copy is loaded; or the merged model, whole or
    a block at a time) plus a row's logits, with headroom."""
    trained = need[TRAINED] * (2 if noise_copy else 1)
    merged = need.get(BLOCKWISE, need[MERGED]) if streamed else need[MERGED]
    return int((max(trained, merged) + need[LOGITS]) * HEADROOM)


def check_verification_fits(need: dict[str, int], device: str, noise_copy: bool = False) -> dict[str, Any]:
    """Refuse (one line, every number) when verification would not fit even with the merged model read a
    block at a time; else the figures for fidelity.json, and how the merged model is loaded."""
    from qlora_pipe.export.streamed_model import STREAMED, WHOLE

    available, source = available_memory(device)
    whole, total = verification_peak(need, noise_copy), verification_peak(need, noise_copy, streamed=True)
    if total > available:
        trained = f"{TRAINED} {need[TRAINED] / GiB:.2f} GiB" + (" twice, with its noise copy" if noise_copy else "")
        merged = f"{BLOCKWISE} {need.get(BLOCKWISE, need[MERGED]) / GiB:.2f} GiB (whole {need[MERGED] / GiB:.2f} GiB)"
        terms = f"the larger of {trained} and {merged}, one after the other; {LOGITS} {need[LOGITS] / GiB:.2f} GiB"
        raise UserError(
            f"export: verification needs about {total / GiB:.2f} GiB ({terms}, +{HEADROOM - 1:.0%}) but this "
            f"machine has {available / GiB:.2f} GiB available ({source}); nothing was written. Free memory, or "
            "export with --no-verify (the merge alone streams in the memory of one tensor)"
        )
    loaded = WHOLE if whole <= available else STREAMED
    return {
        "verification_need_bytes": whole if loaded == WHOLE else total,
        "available_bytes": available,
        "available_from": source,
        "merged_loaded": loaded,
    }


def preflight_verification(recipe, run, base: Path, dtype_name: str) -> dict[str, Any]:
    """Before the merge: would verifying this export fit? Refuses with the numbers if not."""
    import torch

    from qlora_pipe.export.merge import quantized_weight_names
    from qlora_pipe.export.streamed_model import block_names
    from qlora_pipe.machine.hardware import dtype_for_inference
    from qlora_pipe.methods import method_for
    from qlora_pipe.models.loading import training_device

    quantized = quantized_weight_names(base, recipe)  # the trained model is always the 4-bit one
    served = getattr(torch, dtype_for_inference(dtype_name))
    max_length = recipe.data.max_length if isinstance(recipe.data.max_length, int) else 2048
    blocks = block_names(base) if method_for(recipe).verified_block_by_block else []  # a classifier loads whole
    need = verification_need(recipe, base, run.adapter_weights, quantized, served, max_length, blocks)
    noise_copy = loads_noise_copy(recipe, dtype_name)
    return {**check_verification_fits(need, str(training_device()), noise_copy), "terms": need}


def loads_noise_copy(resolved, dtype_name: str) -> bool:
    """Whether verification loads a second trained model for the reference's noise (fidelity.noise_compute;
    counted as large as the trained model: an upper bound for a bf16 copy)."""
    import torch

    from qlora_pipe.export.fidelity import noise_compute

    return noise_compute(resolved, getattr(torch, dtype_name)) is not None
