"""What changes when FSDP or DeepSpeed ZeRO-3 shards the model: passes only the first process records, the adapter.

Under FSDP every forward pass is a collective (each process gathers the layer's shards from the others;
under ZeRO-3 alike, and transformers synchronises each generation step across processes), so a pass whose
result only the first process keeps (held-out scores, preview answers) runs on every process, in step,
with the same inputs: ``runs_model_passes``.

The run's final adapter is written once, by the first process, in PEFT's format, whatever the launch.
Sharded, each process holds a part of every trainable (LoRA) parameter; ``full_adapter_state`` gathers
them (a collective: every process calls it, in the same order) into whole tensors on the first process,
which writes them with PEFT's own ``save_pretrained``. Only the trainable parameters are gathered, never
the frozen 4-bit base, so the gather costs the adapter's size, not the model's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from qlora_pipe.machine.dist import is_main_process
from qlora_pipe.runs import RunDir


def is_sharded(model: Any) -> bool:
    """Whether FSDP2 (torch's fully_shard, applied by accelerate) or DeepSpeed ZeRO-3 (parameters partitioned
    in place, each carrying its ``ds_id``) holds this model in shards."""
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return True
    return any(hasattr(p, "ds_id") for p in model.parameters())


def runs_model_passes(model: Any) -> bool:
    """Whether this process runs a model pass whose result the first process records (see above)."""
    return is_main_process() or is_sharded(model)


def full_adapter_state(model: Any) -> dict[str, Any] | None:
    """The whole trainable parameters, by their usual names, on the first process (None elsewhere)."""
    from torch.distributed.tensor import DTensor

    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in trainable):  # ZeRO-3: gathered in place for the copy
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in trainable]):
            state = {name: p.detach().to("cpu").clone() for name, p in trainable}
        return state if is_main_process() else None
    state = {}
    for name, param in trainable:
        whole = param.full_tensor() if isinstance(param, DTensor) else param
        state[name] = whole.detach().to("cpu").clone()
    return state if is_main_process() else None


def absolute_base_path(adapter_config: Path) -> None:
    """A local base is named by its absolute path, so PEFT finds it from any working directory (a push
    replaces it with the base's public name)."""
    config = json.loads(adapter_config.read_text())
    base = config.get("base_model_name_or_path")
    if base and Path(base).is_dir() and not Path(base).is_absolute():
        config["base_model_name_or_path"] = str(Path(base).resolve())
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_adapter(model: Any, tokenizer: Any, run: RunDir, state_dict: dict[str, Any] | None = None) -> None:
    """Write adapter and tokenizer to a temporary directory, then move them into the run. ``state_dict``: the
    gathered trainable parameters of a sharded model (full_adapter_state); None reads them from the model."""
    tmp = run.root / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(str(tmp))
    absolute_base_path(tmp / "adapter_config.json")
    for item in tmp.iterdir():
        item.replace(run.root / item.name)
    tmp.rmdir()
