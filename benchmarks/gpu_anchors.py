"""The GPU check's runs at other projects' published settings, labelled with those settings.

- torchtune's Llama-3.1-8B QLoRA point (RTX 4090): batch 2, packed 2,048-token rows, r=8, torch.compile;
  compared by utilisation (MFU at the same FLOPs convention), never tokens/s across different cards;
- unsloth's longest context for Llama-3.1-8B QLoRA under 24 GB: batch 1, r=32 on all linear layers,
  our longest with the default settings and with activation offloading;
- flash-attention 2 beside the default sdpa kernel (when flash-attn is installed).

The adapter is swapped in place (PEFT's unload keeps the 4-bit base) to the rank each point needs.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from benchmarks.flops import TransformerShape, peak_bf16_flops_of, qlora_flops_per_token
from benchmarks.gpu_model import REFERENCES, llama_config
from benchmarks.gpu_trials import Search, default_recipe, longest_fitting, planned_bytes, train_steps

GIB = 2**30
TORCHTUNE = REFERENCES["torchtune_llama3.1_8b_qlora_rtx4090"]
UNSLOTH = REFERENCES["unsloth_llama3.1_8b_qlora_longest_context_24gb"]
GOALS = {"peak_memory_gib_at_torchtune_settings": 7.4, "mfu": 0.55, "longest_context_tokens": 32768}


def with_rank(model, tmp: Path, rank: int):
    """The same 4-bit base with a fresh LoRA adapter of this rank (on all linear layers)."""
    from qlora_pipe.models.loading import add_lora

    base = model.unload() if hasattr(model, "unload") else model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return add_lora(base, default_recipe(tmp, 2048, lora_r=rank)).model


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def reference_mfu() -> float:
    """The MFU torchtune's tokens/s implies on an RTX 4090, by our convention (benchmarks/flops.py)."""
    flops = qlora_flops_per_token(TransformerShape.from_config(llama_config()), 8, 2048)["model"]
    return flops * TORCHTUNE["tokens_per_second"] / peak_bf16_flops_of("NVIDIA GeForce RTX 4090")


def torchtune_point(model, tokenizer, tmp: Path, config, steps: int, dry: bool, peak_flops: float | None) -> dict:
    """Our peak memory and MFU at torchtune's settings (model: rank 8 already)."""
    length = 64 if dry else 2048
    row: dict[str, Any] = {"settings": "batch 2, packed rows of 2,048 tokens, r=8, torch.compile", "length": length}
    compiled = not dry  # compiling takes minutes on CPU: dry runs measure the same settings without it
    try:
        result = train_steps(model, tokenizer, tmp, length, steps, config.vocab_size, 2, torch_compile=compiled)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # a compiler failure is a result; the point is still measured, uncompiled
        row["compile_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        compiled = False
        gc.collect()
        result = train_steps(model, tokenizer, tmp, length, steps, config.vocab_size, 2)
    flops = qlora_flops_per_token(TransformerShape.from_config(config), 8, length)["model"]
    peak = result["peak_memory_bytes"]
    row.update(result, torch_compile=compiled, trainable_params=trainable_params(model))
    row["mfu"] = flops * result["tokens_per_second"] / peak_flops if peak_flops else None
    row["reference"] = {**TORCHTUNE, "mfu_implied_on_rtx4090": round(reference_mfu(), 3)}
    row["planned"] = planned_bytes(default_recipe(tmp, length, lora_r=8, micro_batch=2), config, length, 2)
    row["meets_peak_goal"] = peak <= GOALS["peak_memory_gib_at_torchtune_settings"] * GIB if peak else None
    row["meets_mfu_goal"] = row["mfu"] >= GOALS["mfu"] if row["mfu"] is not None else None
    return row


def unsloth_point(model, tokenizer, tmp: Path, config, search: dict[str, Any], progress: dict, save) -> dict:
    """Our longest context at unsloth's settings (model: rank 32 already), default and offloaded."""
    from qlora_pipe.errors import UserError
    from qlora_pipe.training.speed_switches import check_speed_switches

    out: dict[str, Any] = {"settings": "batch 1, r=32, all linear layers", "reference": UNSLOTH}
    for name, switches in (("default", {}), ("activation_offloading", {"activation_offloading": True})):
        try:
            check_speed_switches(default_recipe(tmp, search["start"], **switches))
        except UserError as exc:
            out[name] = {"skipped": str(exc)}
            continue
        tried = progress.setdefault(name, [])  # on disk after every trial, should the stage be cut short
        out[name] = longest_fitting(
            model, tokenizer, tmp, config.vocab_size, Search(**search, tried=tried, save=save), **switches
        )
        save()
    longest, goal = out["default"].get("longest_fitting_length"), GOALS["longest_context_tokens"]
    out["meets_goal"] = longest >= goal if longest and search["limit"] >= goal else None  # None: a dry run
    out["trainable_params"] = trainable_params(model)
    return out


def flash_attention(model, tokenizer, tmp: Path, length: int, steps: int, vocab: int) -> dict[str, Any]:
    """One length with flash-attention 2 instead of sdpa; the kernel is set back to sdpa afterwards."""
    from qlora_pipe.errors import UserError
    from qlora_pipe.training.speed_switches import check_speed_switches

    recipe = default_recipe(tmp, length)
    recipe.model.attn_implementation = "flash_attention_2"
    try:
        check_speed_switches(recipe)
    except UserError as exc:
        return {"length": length, "skipped": str(exc)}
    base = model.get_base_model()
    base.set_attn_implementation("flash_attention_2")
    try:
        return {"length": length, **train_steps(model, tokenizer, tmp, length, steps, vocab)}
    finally:
        base.set_attn_implementation("sdpa")
