"""Who am I in a multi-process launch (torchrun / accelerate launch), read before any process group exists."""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Only this process writes run files and prints the run's messages."""
    return rank() == 0


def sharded_launch() -> str | None:
    """'fsdp' or 'deepspeed' when accelerate launched us with one of them (the weights must not be
    pinned to one device then), else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    return None


def close_process_group() -> None:
    """End a torchrun launch cleanly: exiting with gloo's threads still running aborts the process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
