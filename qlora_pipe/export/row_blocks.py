"""One weight rebuilt, merged, checked, cast and written a block of rows at a time: no whole fp32 copy of it.

The default export adds the LoRA delta to dequant(NF4(W)) in fp32 (merge.py). Done on a whole weight, the
largest weight is held several times over in fp32 (bitsandbytes' quantizer makes four fp32-sized
temporaries of its input, then the dequantized weight, the delta, the copy the share of the delta kept is
measured against) and sets the export's peak memory. Here a weight is read twice in blocks of rows: the
first pass quantizes each block (the packed 4-bit bytes, an eighth of fp32, are all that is kept), the
second dequantizes each block in fp32, adds its rows of ``scale * (B @ A)``, checks, casts and writes it.

The bytes are those of the whole-weight merge: NF4 quantizes each run of 64 consecutive values on its own
and blocks start on such a boundary (compat/bitsandbytes.py ``NF4Rows``); each merged value is one matrix
product element, and a block's product computes it as the whole product does (checked for blocks of 4 rows
and more; a block has at least ``MIN_ROWS``); DoRA's norm is per row. Weights stored transposed (GPT-2's
Conv1D: the adapter's rows are the file's columns) and weights that are not matrices are merged whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qlora_pipe.compat.bitsandbytes import NF4Rows
from qlora_pipe.errors import UserError
from qlora_pipe.export.delta_kept import DeltaKept, share_terms
from qlora_pipe.export.tensor_checks import check_finite, check_fits_float16, release_freed_memory
from qlora_pipe.export.tensor_files import StreamingShardWriter, TensorReader
from qlora_pipe.models.loading import DTYPES
from qlora_pipe.recipe import Recipe


@dataclass
class LoraWeights:
    """One adapted weight's LoRA factors (B @ A, times scale; DoRA's magnitude where trained)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None


BLOCK_ELEMENTS = 1 << 19  # values per block of rows: 2 MiB in fp32
# MKL's small-matrix kernels for 1 to 3 rows sum in another order than the whole product (measured); a block
# of at least this many rows is computed as the whole matrix is.
MIN_ROWS = 64


def check_adapter_fits(lora: LoraWeights, shape: tuple[int, ...]) -> None:
    """B @ A must be a (rows, columns) update of the weight (oriented as the adapter sees it)."""
    if (lora.b.shape[0], lora.a.shape[1]) != tuple(shape) or lora.b.shape[1] != lora.a.shape[0]:
        raise UserError(
            f"the adapter does not fit its base model: LoRA B {tuple(lora.b.shape)} @ A {tuple(lora.a.shape)} "
            f"cannot update a {tuple(shape)} weight (trained on another model?)"
        )


def row_starts(rows: int, columns: int, blocksize: int) -> list[int]:
    """First row of each block: about BLOCK_ELEMENTS values, at least MIN_ROWS rows, starting on a quantization
    block's boundary (``blocksize`` values); the last rows join the block before when fewer than MIN_ROWS."""
    align = blocksize // math.gcd(columns, blocksize)
    step = max(MIN_ROWS, BLOCK_ELEMENTS // max(columns, 1))
    step = -(-step // align) * align
    starts = list(range(0, rows, step)) or [0]
    if len(starts) > 1 and rows - starts[-1] < MIN_ROWS:
        starts.pop()
    return starts


def merged_rows(block: torch.Tensor, lora: LoraWeights, start: int) -> torch.Tensor:
    """Rows start.. of W + scale * B @ A in fp32, in place (DoRA: each row rescaled to its learned magnitude)."""
    merged = block.float()
    stop = start + merged.shape[0]
    delta = lora.b[start:stop].float() @ lora.a.float()
    delta.mul_(lora.scale)
    merged.add_(delta)
    del delta
    if lora.magnitude is not None:
        norm = merged.norm(p=2, dim=1, keepdim=True)
        merged.mul_(lora.magnitude[start:stop].float().view(-1, 1) / norm)
    return merged


def merge_in_row_blocks(
    reader: TensorReader,
    name: str,
    recipe: Recipe,
    lora: LoraWeights | None,
    quantized: bool,
    dtype: torch.dtype,
    writer: StreamingShardWriter,
    kept: DeltaKept,
) -> None:
    """Write ``name`` (a matrix): dequant(NF4(W)) when ``quantized``, plus the LoRA delta when ``lora``."""
    rows, columns = reader.entry(name).shape
    if lora is not None:
        check_adapter_fits(lora, (rows, columns))
    q = recipe.quantization  # a run's recorded recipe: its dtypes settled when it trained
    nf4 = NF4Rows(q.quant_type, q.double_quant) if quantized else None
    starts = row_starts(rows, columns, nf4.blocksize if nf4 else 1)
    blocks = list(zip(starts, [*starts[1:], rows], strict=True))
    if nf4 is not None:
        for start, stop in blocks:
            nf4.add(reader.read_rows(name, start, stop).to(DTYPES[q.compute_dtype]))
            release_freed_memory()
        nf4.finish()
    dot = norm = 0.0
    for index, (start, stop) in enumerate(blocks):
        block = nf4.rows(index) if nf4 is not None else reader.read_rows(name, start, stop)
        before = block.float().clone() if lora is not None else None
        out = merged_rows(block, lora, start) if lora is not None else block
        del block
        check_finite(name, out)
        if dtype == torch.float16:
            check_fits_float16(name, out)
        served = out.to(dtype) if out.is_floating_point() else out
        if before is not None:
            terms = share_terms(before, out, served)
            dot, norm = dot + terms[0], norm + terms[1]
        writer.write(name, served)
        del out, served, before
        release_freed_memory()  # the blocks' temporaries, interleaved with what is kept, would pile up
    if lora is not None:
        kept.add_terms(name, dot, norm)
