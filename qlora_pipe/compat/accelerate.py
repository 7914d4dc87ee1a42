"""Reaches into accelerate. Verified with accelerate 1.16.0 (with transformers 5.25.0, torch 2.13.0).

fsdp_on_cpu
    ``accelerate launch`` with an FSDP config (``ACCELERATE_USE_FSDP=true``) on a machine without a GPU:
    AcceleratorState classifies the launch as MULTI_CPU before it looks at FSDP (state.py,
    ``_prepare_backend``: FSDP is only honoured for the MULTI_GPU family), so the Trainer would silently
    wrap the model in DDP and every process would hold the whole model. Switching the shared state to
    FSDP with the plugin accelerate built from the launch's environment runs accelerate's own FSDP2 path
    (``fsdp2_prepare_model``, sharded checkpoints through torch.distributed.checkpoint) over gloo: the
    same code a GPU launch runs, on the CPU, which is how tests/test_fsdp.py tests it. GPU launches never
    take this path. Remove once accelerate honours FSDP on CPU launches.
    Caught by: tests/test_fsdp.py::test_two_process_fsdp_matches_one_process (the run must report FSDP,
    and its checkpoint holds per-rank shards).

quiet_sharded_save_messages
    accelerate logs four INFO lines per FSDP checkpoint ("[RANK 0] Saving model to ...", its logger
    ``accelerate.utils.fsdp_utils``) between the progress line's updates; they are shown with --debug only.
"""

from __future__ import annotations

from typing import Any

VERIFIED = {"accelerate": "1.16.0", "transformers": "5.25.0", "torch": "2.13.0"}


def fsdp_on_cpu(accelerator: Any) -> bool:
    """Make a CPU launch with an FSDP config use FSDP (see above). True when it switched."""
    import os

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* environment, as accelerate does
    state.distributed_type = DistributedType.FSDP
    return True


def quiet_sharded_save_messages() -> None:
    """accelerate's per-checkpoint FSDP save/load lines, unless the run logs at DEBUG (--debug)."""
    import logging

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("accelerate.utils.fsdp_utils").setLevel(logging.WARNING)
