"""The optimizer a run steps with: the recipe's, except where it cannot run (training and the planner share it).

- Paged optimizers move their state between GPU and CPU memory: without a GPU they run unpaged.
- bitsandbytes' optimizers (8-bit, paged) call bitsandbytes kernels on each parameter, and torch's DTensor
  has no sharding rule for them, so they cannot step FSDP2's sharded parameters (bitsandbytes 0.50.2,
  torch 2.13: ``NotImplementedError: Operator bitsandbytes.optimizer_update_32bit.default does not have a
  sharding strategy registered`` at the first step). Under FSDP torch's fused AdamW takes their place: it
  steps DTensor shards (checked in a 2-process FSDP2 run on CPU) and keeps its two states in the
  parameters' dtype, not 8-bit, which the planner counts (`qlora-pipe plan --gpus N`).
"""

from __future__ import annotations

from dataclasses import dataclass

BITSANDBYTES = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit")
UNDER_FSDP = "adamw_torch_fused"


@dataclass(frozen=True)
class OptimizerChoice:
    name: str  # transformers' `optim` name
    notice: str | None = None  # one line saying why it is not the recipe's, when it is not


def optimizer_used(requested: str, gpu: bool, fsdp: bool) -> OptimizerChoice:
    if fsdp and requested in BITSANDBYTES:
        return OptimizerChoice(
            UNDER_FSDP,
            f"training.optimizer {requested} runs as {UNDER_FSDP} under FSDP "
            "(bitsandbytes' optimizers cannot step sharded parameters)",
        )
    if not gpu and requested.startswith("paged_"):
        unpaged = requested.removeprefix("paged_")
        return OptimizerChoice(unpaged, f"no GPU: optimizer {requested} runs as {unpaged} (paging needs CUDA)")
    return OptimizerChoice(requested)
