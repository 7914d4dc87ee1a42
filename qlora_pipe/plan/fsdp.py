"""Per-GPU peak memory under FSDP-QLoRA (`qlora-pipe plan RECIPE --gpus N`).

FSDP (FSDP1's FULL_SHARD, FSDP2's reshard_after_forward) splits every parameter N ways and gathers a
wrapped unit (here: one decoder layer) whole only while it runs.
With QLoRA the 4-bit weights are stored in the compute dtype (quantization.quant_storage = bfloat16),
so a packed NF4 weight keeps its n/2 bytes and FSDP shards it like any bf16 tensor. Per GPU:

- the parameter shards: 1/N of the packed 4-bit weights, of the 16-bit rest, of the LoRA adapter;
- the LoRA gradients and optimizer states, sharded 1/N as well (after each reduce-scatter);
- the 4-bit quantization state (absmax, nested absmax, code books) on every GPU in full: bitsandbytes
  keeps it on the module (``Linear4bit.quant_state``), outside the parameters FSDP flattens and shards,
  and ``Linear4bit.forward`` restores it onto the gathered weight
  (``bitsandbytes.nn.modules.fix_4bit_weight_quant_state_from_module``);
- FSDP's root unit whole: the embeddings, lm_head and final norm are not inside a decoder layer, so they
  belong to the outermost wrapped module. FSDP1 never reshards the root after forward
  (``_post_forward_reshard``: "Do not free the root's parameters ... for FULL_SHARD"); FSDP2 gathers it
  in the root's pre-forward until its post-forward, and again from the start of backward until the final
  callback at its end (frozen parameters, no earlier post-backward): either way it is whole at the peak;
- two decoder layers gathered whole (the one running and the one prefetched for backward), in the
  storage dtype, with their LoRA weights;
- one decoder layer's LoRA gradients whole, the input of the reduce-scatter;
- activations and the transient peak per micro batch, as on one GPU: each GPU runs its own micro batch.

With CPU offload (accelerate's ``fsdp_offload_params: true``; FSDP2's ``CPUOffloadPolicy``) the shards,
their gradients and the optimizer step live in CPU RAM; what a GPU holds is the gathered units, the
quantization state and the activations. NCCL's own buffers are outside PyTorch's allocator, not counted.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from qlora_pipe.machine.optimizers import OptimizerChoice, optimizer_used
from qlora_pipe.plan.shapes import ModelShape

if TYPE_CHECKING:
    from qlora_pipe.plan.settings import PlanSettings

Row = tuple[str, int, str]
PREFETCHED_LAYERS = 2  # the decoder layer running and the next one, all-gathered ahead (BACKWARD_PRE)
QUANT_STATE_TERM = "4-bit quant state"
ROOT_TERM = "root unit gathered"
LAYERS_TERM = "layers gathered"
REDUCE_TERM = "gradient reduce-scatter"
SHARDED = ("base weights, 4-bit", "base weights, 16-bit", "base weights, not quantized", "base weights, other")
TRAINABLE = ("LoRA weights", "LoRA gradients", "optimizer states", "optimizer states (paged)")


def root_params(shape: ModelShape) -> int:
    """Parameters outside the decoder layers: input embeddings, an untied lm_head, the final norm."""
    return min(shape.other_params, shape.vocab_size * shape.hidden_size + shape.lm_head_params + shape.hidden_size)


def packed_bytes(numel: int) -> int:
    """A 4-bit weight's packed data alone: two weights a byte, whatever dtype stores the bytes."""
    return math.ceil(numel / 2)


def layer_weight_bytes(shape: ModelShape, s: PlanSettings) -> int:
    """One decoder layer's frozen weights as FSDP gathers them: packed 4-bit (or 16-bit) linears, norms."""
    layer0 = [lin for lin in shape.linears if ".0." in lin.name]
    if s.quantized:
        linears = sum(packed_bytes(lin.in_features * lin.out_features) for lin in layer0)
    else:
        linears = sum(lin.in_features * lin.out_features for lin in layer0) * s.compute_bytes
    norms = (shape.other_params - root_params(shape)) // max(shape.num_layers, 1) * s.compute_bytes
    return linears + norms


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _shard(total: int, s: PlanSettings, what: str) -> tuple[int, str]:
    if s.cpu_offload:
        return 0, f"in CPU RAM (CPU offload); {_gib(total)} over {s.gpus} GPUs: {what}"
    return math.ceil(total / s.gpus), f"1/{s.gpus} of {_gib(total)}: {what}"


def fsdp_rows(
    shape: ModelShape, s: PlanSettings, rows: list[Row], layer_lora_params: int, lora_bytes: int
) -> list[Row]:
    """The one-GPU weight and trainable rows turned into one GPU's share under FSDP, plus FSDP's own terms.

    ``layer_lora_params``: trainable parameters of one decoder layer; ``lora_bytes``: bytes per trainable value.
    """
    out: list[Row] = []
    for name, size, note in rows:
        if name == "base weights, 4-bit":
            packed = sum(packed_bytes(lin.in_features * lin.out_features) for lin in shape.linears)
            out.append((name, *_shard(packed, s, "NF4 packed, stored as bfloat16 (quant_storage)")))
            state = size - packed
            out.append((QUANT_STATE_TERM, state, "absmax + code books of every layer, whole on every GPU"))
        elif name in SHARDED or name in TRAINABLE or name.startswith("reference adapter"):
            out.append((name, *_shard(size, s, note)))
        else:
            out.append((name, size, note))
    root = root_params(shape) * s.compute_bytes
    layer = layer_weight_bytes(shape, s) + layer_lora_params * lora_bytes
    out += [
        (ROOT_TERM, root, "embeddings, lm_head, final norm: FSDP's root unit, whole from forward to backward's end"),
        (LAYERS_TERM, PREFETCHED_LAYERS * layer, f"2 decoder layers whole (running + prefetched): 2 x {_gib(layer)}"),
        (REDUCE_TERM, layer_lora_params * lora_bytes, "one layer's LoRA gradients whole, before the reduce-scatter"),
    ]
    return out


def planned_optimizer(s: PlanSettings) -> OptimizerChoice:
    """The optimizer the planned run steps with: under FSDP (gpus > 1) never bitsandbytes' (optimizers.py)."""
    return optimizer_used(s.optimizer, gpu=True, fsdp=s.gpus > 1)


def fsdp_header(s: PlanSettings) -> str:
    offload = ", CPU offload (fsdp_offload_params)" if s.cpu_offload else ""
    header = (
        f"FSDP on {s.gpus} GPUs: fully sharded, 4-bit weights stored as bfloat16 (quant_storage){offload}; "
        f"every figure is per GPU, each GPU runs its own micro batch"
    )
    notice = planned_optimizer(s).notice
    return f"{header}\n{notice}; planned as such" if notice else header
