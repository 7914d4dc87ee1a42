"""Export: dequantize -> merge in fp32 -> cast once -> sharded safetensors, streaming.

The adapter was trained against dequant(NF4(W)), not W. The default merge base reproduces those
weights: each base tensor is read from its safetensors shard, quantized with the run's own
settings through the same bitsandbytes path the training load used, and dequantized. The LoRA
delta (scale * B @ A, rsLoRA scaling and DoRA magnitude handled) is added in fp32 and the result
cast once to the export dtype. A matrix is rebuilt and merged a block of rows at a time (row_blocks.py)
and written as it is made: peak memory is one block's work plus the adapter. Never imports trl.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from qlora_pipe.compat.bitsandbytes import dequantized_fp32, quantized_like_loading
from qlora_pipe.compat.transformers import modules_kept_unquantized
from qlora_pipe.errors import UserError
from qlora_pipe.export.delta_kept import DeltaKept
from qlora_pipe.export.row_blocks import LoraWeights, check_adapter_fits, merge_in_row_blocks
from qlora_pipe.export.tensor_checks import check_finite, check_fits_float16, release_freed_memory
from qlora_pipe.export.tensor_files import StreamingShardWriter, TensorEntry, TensorReader
from qlora_pipe.models.loading import DTYPES
from qlora_pipe.recipe import Recipe
from qlora_pipe.recipe.model_source import local_path
from qlora_pipe.runs import RunDir

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "base_model.model."


def base_checkpoint_dir(recipe: Recipe) -> Path:
    """The base model's files: a local directory, or the Hub snapshot (safetensors and configs only)."""
    from qlora_pipe.models.gguf_source import base_folder, gguf_file_of

    name = recipe.model.name_or_path
    gguf = gguf_file_of(name)
    local = base_folder(gguf) if gguf is not None else local_path(name)
    if local is not None:
        if not local.is_dir():
            raise UserError(f"base model not found: {name}")
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=recipe.model.revision, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as exc:  # huggingface_hub raises several types for offline / missing / gated
        raise UserError(f"base model {name!r}: cannot fetch its files: {exc}") from exc


def base_shards(base: Path) -> list[Path]:
    index = base / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [base / f for f in files]
    single = base / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"{base}: no safetensors weights (model.safetensors or an index); export needs them")


def load_lora(run: RunDir) -> tuple[dict[str, LoraWeights], dict[str, torch.Tensor], dict[str, Any]]:
    """Adapter deltas keyed by the base weight name, full replacements (modules_to_save), and the config."""
    if not run.adapter_weights.is_file() or not run.adapter_config.is_file():
        raise UserError(f"{run.root}: no adapter ({run.adapter_weights.name}, {run.adapter_config.name})")
    try:
        config = json.loads(run.adapter_config.read_text())
        tensors = load_file(str(run.adapter_weights))
    except Exception as exc:  # safetensors raises SafetensorError on a truncated or corrupt file
        raise UserError(f"{run.adapter_weights}: unreadable adapter ({exc})") from exc
    r, alpha = config["r"], config["lora_alpha"]
    deltas: dict[str, LoraWeights] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(ADAPTER_PREFIX)
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            short = module.rsplit(".", 1)[-1]
            rank = config.get("rank_pattern", {}).get(short, r)
            scale_alpha = config.get("alpha_pattern", {}).get(short, alpha)
            scale = scale_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
            magnitude = tensors.get(f"{ADAPTER_PREFIX}{module}.lora_magnitude_vector")
            deltas[f"{module}.weight"] = LoraWeights(
                tensor, tensors[f"{ADAPTER_PREFIX}{module}.lora_B.weight"], scale, magnitude
            )
        elif ".lora_" not in name:
            replaced[name] = tensor
    if not deltas and not replaced:
        raise UserError(f"{run.adapter_weights}: the adapter holds no LoRA weights")
    return deltas, replaced, config


def quantized_weight_names(base: Path, recipe: Recipe) -> set[str]:
    """Weights transformers puts in 4-bit when loading this base: every Linear/Conv1D but the ones it skips."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from accelerate import init_empty_weights
    from qlora_pipe.methods import method_for

    if not recipe.quantization.enabled:
        return set()
    own = method_for(recipe).quantized_weight_names(base, recipe)
    if own is not None:
        return own
    config = AutoConfig.from_pretrained(base, trust_remote_code=recipe.model.trust_remote_code)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    skipped = modules_kept_unquantized(skeleton)
    names = set()
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear | Conv1D) and not any(
            name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skipped
        ):
            names.add(f"{name}.weight")
    return names


def nf4_roundtrip(weight: torch.Tensor, recipe: Recipe, transposed: bool) -> torch.Tensor:
    """dequant(quant(W)) exactly as the training load produced it (same class, same settings), in fp32.
    The caller passes its only reference: the 16-bit source is dropped once quantized."""
    q = recipe.quantization  # a run's recorded recipe: its dtypes settled when it trained
    value = weight.to(DTYPES[q.compute_dtype])
    del weight
    value = value.T.contiguous() if transposed else value
    packed = quantized_like_loading(value, q.quant_type, q.double_quant, DTYPES[q.quant_storage])
    del value
    restored = dequantized_fp32(packed)
    return restored.T if transposed else restored


def merge_tensor(base: torch.Tensor, lora: LoraWeights, transposed: bool) -> torch.Tensor:
    """W + scale * B @ A in fp32 (DoRA: rescaled per output row to the learned magnitude), in place: the
    fp32 base and one fp32 delta are the only full-size tensors (the same arithmetic, so the same bits,
    as computing W + (scale * (B @ A)) out of place).

    ``transposed``: the checkpoint stores this weight as (in, out) (GPT-2 Conv1D), while B @ A is
    (out, in) whether PEFT adapted the Conv1D itself or the (out, in) 4-bit layer that replaced it."""
    merged = base.float()
    del base
    oriented = merged.T if transposed else merged
    check_adapter_fits(lora, tuple(oriented.shape))
    delta = lora.b.float() @ lora.a.float()
    delta.mul_(lora.scale)
    oriented.add_(delta)
    del delta
    if lora.magnitude is not None:
        norm = oriented.contiguous().norm(p=2, dim=1, keepdim=True)
        oriented.mul_(lora.magnitude.float().view(-1, 1) / norm)
    return merged


def conv1d_weight_names(base: Path, recipe: Recipe) -> set[str]:
    """GPT-2 style Conv1D layers store their weight transposed (in, out)."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    from accelerate import init_empty_weights
    from qlora_pipe.methods import method_for

    config = transformers.AutoConfig.from_pretrained(base, trust_remote_code=recipe.model.trust_remote_code)
    auto = getattr(transformers, method_for(recipe).base_class)
    with init_empty_weights():
        skeleton = auto.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    return {f"{n}.weight" for n, m in skeleton.named_modules() if isinstance(m, Conv1D)}


def output_entries(readers: list[TensorReader], replaced: dict[str, torch.Tensor], dtype: torch.dtype, skip=()):
    """Every tensor the export writes, in order, with its dtype and shape: the base checkpoint's (floating
    point ones in the export dtype), then trained replacements of tied weights (written as their own)."""
    entries, seen = [], set()
    for reader in readers:
        for name in (n for n in reader.names() if n not in skip):
            entry = reader.entry(name)
            shape = tuple(replaced[name].shape) if name in replaced else entry.shape
            out_dtype = dtype if name in replaced or entry.dtype.is_floating_point else entry.dtype
            entries.append(TensorEntry(name, out_dtype, shape))
            seen.add(name)
    untied = sorted(set(replaced) - seen)
    return entries + [TensorEntry(name, dtype, tuple(replaced[name].shape)) for name in untied], untied


def by_rows(reader: TensorReader, name: str, transposed: set[str]) -> bool:
    """Merged in blocks of rows (row_blocks.py): a matrix stored as the adapter sees it (not GPT-2's Conv1D)."""
    return len(reader.entry(name).shape) == 2 and name not in transposed


def copy_through(reader: TensorReader, name: str, writer: StreamingShardWriter, dtype: torch.dtype) -> None:
    """A tensor the merge leaves alone (embeddings, norms, unadapted 16-bit layers): read, checked, cast and
    written piece by piece, never whole (casting is elementwise: the same bits as casting it whole)."""
    for piece in reader.read_chunks(name):
        check_finite(name, piece)
        if dtype == torch.float16 and piece.is_floating_point():
            check_fits_float16(name, piece)
        writer.write(name, piece.to(dtype) if piece.is_floating_point() else piece)


def merge_stream(
    recipe: Recipe,
    run: RunDir,
    base: Path,
    folder: Path,
    merge_base: str,
    dtype: torch.dtype,
    max_bytes: int,
    with_adapter: bool = True,
) -> dict[str, Any]:
    """Read base tensors one by one, merge, cast once and write each straight into its planned place in the
    output shards. Peak memory: the libraries, the adapter and one tensor's merge; not the shard sizes.
    A classifier leaves out the base tensors it does not have (the causal LM head). Without the adapter
    (``with_adapter=False``) the output is the base as training saw it: the NF4 weights dequantized, nothing
    added (the unmerged export's base, which the adapter is served on)."""
    from qlora_pipe.terminal import progress_bar as tqdm  # plain lines when not on a terminal

    deltas, replaced, _ = load_lora(run) if with_adapter else ({}, {}, {})
    quantized = quantized_weight_names(base, recipe) if merge_base == "dequantized" else set()
    transposed = conv1d_weight_names(base, recipe)
    shards = base_shards(base)
    from qlora_pipe.methods import method_for

    skip = method_for(recipe).unused_base_tensors(base, shards, recipe)
    counts = {"merged": 0, "dequantized": 0, "replaced": 0, "copied": 0}
    kept = DeltaKept()
    readers, writer = [TensorReader(shard) for shard in shards], None
    try:
        entries, untied = output_entries(readers, replaced, dtype, skip)
        writer = StreamingShardWriter(folder, entries, max_bytes)
        with tqdm(total=len(entries), desc="merging", unit="tensor") as bar:
            for reader in readers:
                for name in (n for n in reader.names() if n not in skip):
                    before = None
                    if name in replaced:
                        out, kind = replaced.pop(name).float(), "replaced"
                    elif (name in quantized or name in deltas) and by_rows(reader, name, transposed):
                        lora = deltas.pop(name, None)
                        merge_in_row_blocks(reader, name, recipe, lora, name in quantized, dtype, writer, kept)
                        counts["dequantized"] += name in quantized
                        counts["merged" if lora else "copied"] += 1
                        release_freed_memory()
                        bar.update()
                        continue
                    elif name in quantized or name in deltas:
                        tensor = (
                            nf4_roundtrip(reader.read(name), recipe, name in transposed)
                            if name in quantized
                            else reader.read(name)
                        )
                        counts["dequantized"] += name in quantized
                        lora = deltas.pop(name, None)
                        before = tensor.float().clone() if lora is not None else None  # for the share kept
                        out = merge_tensor(tensor, lora, name in transposed) if lora is not None else tensor
                        del tensor
                        kind = "merged" if lora else "copied"
                    else:
                        copy_through(reader, name, writer, dtype)
                        counts["copied"] += 1
                        bar.update()
                        continue
                    check_finite(name, out)
                    served = out.to(dtype) if out.is_floating_point() else out
                    if dtype == torch.float16:
                        check_fits_float16(name, out)
                    if kind == "merged":
                        kept.add(name, before, out, served)
                    before = None
                    writer.write(name, served)
                    del out, served
                    release_freed_memory()
                    counts[kind] += 1
                    bar.update()
            if deltas:
                raise UserError(
                    f"export: adapter weights for {sorted(deltas)[0]} match no tensor of the base checkpoint"
                )
            for name in untied:  # modules_to_save of a tied weight: written as its own tensor
                writer.write(name, replaced[name].to(dtype))
                counts["replaced"] += 1
                bar.update()
        writer.finish()
    finally:
        for reader in readers:
            reader.close()
        if writer is not None:
            writer.close()
    summary = {"untied": untied, "bytes": writer.total_bytes, "base_shards": len(shards), "delta_kept": kept.summary()}
    return {**counts, **summary}
