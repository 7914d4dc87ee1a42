"""A merged model too large for this machine, verified layer by layer from its own files.

At 7B the merged model in the dtype this CPU computes in (fp32 where 16-bit matmuls are emulated) is
28 GiB, more than a 24 GB host. Verification then loads it with transformers' disk offload: each decoder
block (the model class's ``_no_split_modules``, compat/transformers.py) stays on the meta device and
accelerate's hooks read its weights from the export's own safetensors files for its forward only, cast
to the compute dtype, and drop them after; the embeddings, the head and the final norm stay loaded. A
safetensors checkpoint is offloaded in place: nothing is copied. The weights and the arithmetic are those
of the whole model, so its logits are the whole model's bit for bit (tests/test_verify_memory.py); what
it costs is reading each block's weights again for every row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qlora_pipe.errors import UserError

WHOLE, STREAMED = "whole", "layer by layer from its files"  # fidelity.json memory.merged_loaded


def skeleton(folder: Path) -> Any:
    """The model of ``folder``'s config on the meta device: its module names, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def block_names(folder: Path) -> list[str]:
    from qlora_pipe.compat.transformers import decoder_blocks

    return decoder_blocks(skeleton(folder))


def streamed_bytes(sizes: dict[str, int], blocks: list[str]) -> int:
    """Bytes held at once when ``blocks`` are read one at a time: everything outside them, plus the largest."""
    per_block = dict.fromkeys(blocks, 0)
    resident = 0
    for name, size in sizes.items():
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if block is None:
            resident += size
        else:
            per_block[block] += size
    return resident + max(per_block.values(), default=0)


def streamed_device_map(model: Any, device: str) -> dict[str, str]:
    """Each decoder block on "disk" (read when it runs), every other module and loose weight on ``device``."""
    from qlora_pipe.compat.transformers import decoder_blocks

    blocks = decoder_blocks(model)
    mapping: dict[str, str] = {}

    def place(module: Any, prefix: str) -> None:
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            mapping[prefix + name] = device
        for name, child in module.named_children():
            full = prefix + name
            if full in blocks:
                mapping[full] = "disk"
            elif any(block.startswith(full + ".") for block in blocks):
                place(child, full + ".")
            else:
                mapping[full] = device

    place(model, "")
    return mapping


def load_streamed(folder: Path, dtype: torch.dtype, device: str) -> Any:
    """``folder``'s causal LM, its decoder blocks read from its files as they run (see the module's text)."""
    from transformers import AutoModelForCausalLM

    mapping = streamed_device_map(skeleton(folder), device)
    if "disk" not in mapping.values():
        raise UserError(f"export: {folder}: no decoder blocks found to verify one at a time; verify with more memory")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=mapping)
    except ValueError as exc:
        if "offload_folder" not in str(exc):
            raise
        raise UserError(
            f"export: {folder}: this model's weights are converted when they load, so they cannot be read one "
            "block at a time from the export's files; verify on a machine with the memory for the whole merged "
            "model, or export with --no-verify"
        ) from exc
    return model.eval()
