"""What this machine computes in: the dtype it runs natively, and the CPU threads free to this process.

bf16 is the QLoRA default, but only where the hardware runs it natively: CUDA GPUs of compute
capability 8.0+ and x86 CPUs with AVX512-BF16 or AMX. Elsewhere PyTorch emulates it; measured on
an AVX2-only CPU, one 2048x512 by 512x1536 linear (forward + backward) took 5.3 s in bf16 and
0.17 s in fp32. So ``precision: auto`` picks bf16 where it is native, fp16 with loss scaling on
older GPUs, and fp32 on other CPUs. No torch import at module level: the recipe and the planner
use this without loading a model.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_pipe.machine.cpu_threads import available_cpus

# CPU flags (as /proc/cpuinfo spells them) of instructions that compute in bf16 natively.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN (which runs PyTorch's bf16 CPU matmuls) can be capped below its bf16 instructions with
# ONEDNN_MAX_CPU_ISA; a capped process computes bf16 as slowly as a CPU without them.
ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")
PRECISION_OF_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DTYPE_OF_PRECISION = {v: k for k, v in PRECISION_OF_DTYPE.items()}
THREADS_ENV = "QLORA_PIPE_CPU_THREADS"


@dataclass(frozen=True)
class Hardware:
    """The device a run computes on, as far as dtype choice is concerned."""

    kind: str  # "cuda" or "cpu"
    name: str
    native_bf16: bool
    detail: str  # why bf16 is or is not native, in a few words

    def describe(self) -> str:
        return f"{self.name} ({self.detail})"


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # training.precision: bf16, fp16 or fp32
    compute_dtype: str  # quantization.compute_dtype: bfloat16, float16 or float32
    reason: str
    notice: str | None = None  # an explicit choice that runs slowly on this hardware

    def as_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "compute_dtype": self.compute_dtype, "reason": self.reason}


def cpu_info() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo (empty where there is none)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    info: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_flags(info: dict[str, str] | None = None) -> frozenset[str]:
    info = cpu_info() if info is None else info
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def cpu_name(info: dict[str, str] | None = None) -> str:
    info = cpu_info() if info is None else info
    return info.get("model name") or platform.processor() or platform.machine() or "cpu"


def isa_summary(flags: frozenset[str]) -> str:
    """The vector extensions that decide CPU speed, e.g. 'AVX2, AVX-512, AVX512-BF16, AMX-BF16'."""
    known = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")]
    found = [label for flag, label in known if flag in flags]
    return ", ".join(found) or "no AVX2"


def machine_description() -> str:
    """Where a measurement was taken, e.g. 'Intel(R) Xeon(R) Processor, 2 CPUs (AVX2, AVX-512, AMX-BF16), no GPU'."""
    import torch

    info = cpu_info()
    cpus, _ = available_cpus()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    capped = f", oneDNN capped at {cap}" if cap else ""
    return f"{cpu_name(info)}, {cpus} CPUs ({isa_summary(cpu_flags(info))}{capped}), {gpu}"


def cpu_hardware(flags: frozenset[str] | None = None, environ: dict[str, str] | None = None) -> Hardware:
    """This CPU; bf16 is native with AVX512-BF16 or AMX, unless oneDNN was capped below them."""
    info = cpu_info() if flags is None else {}
    flags = cpu_flags(info) if flags is None else flags
    environ = os.environ if environ is None else environ
    name = cpu_name(info) if info else "CPU"
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    cap = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if native and cap in ONEDNN_CAPS_WITHOUT_BF16:
        return Hardware("cpu", name, False, f"bf16 instructions disabled by ONEDNN_MAX_CPU_ISA={cap}")
    if native:
        return Hardware("cpu", name, True, f"native bf16: {isa_summary(flags)}")
    return Hardware("cpu", name, False, f"no native bf16: {isa_summary(flags)}, no AVX512-BF16 or AMX")


def cuda_hardware(capability: tuple[int, int], name: str) -> Hardware:
    major, minor = capability
    native = major >= 8
    detail = f"compute capability {major}.{minor}" + ("" if native else ", bf16 needs 8.0+")
    return Hardware("cuda", name, native, detail)


def detect_hardware(device_type: str | None = None) -> Hardware:
    """The hardware this process trains on: its GPU when CUDA is available, else the CPU."""
    import torch

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        return cuda_hardware(torch.cuda.get_device_capability(), torch.cuda.get_device_name())
    return cpu_hardware()


def resolve_precision(precision: str, compute_dtype: str, hardware: Hardware) -> PrecisionChoice:
    """Turn ``auto`` into the dtype the hardware runs natively; the other key follows an explicit one."""
    if precision == "auto" and compute_dtype == "auto":
        chosen = "bf16" if hardware.native_bf16 else "fp16" if hardware.kind == "cuda" else "fp32"
        reason = f"auto: {chosen} on {hardware.describe()}"
        return PrecisionChoice(chosen, DTYPE_OF_PRECISION[chosen], reason)
    if precision == "auto":
        precision = PRECISION_OF_DTYPE[compute_dtype]
        reason = f"follows quantization.compute_dtype: {compute_dtype}"
    elif compute_dtype == "auto":
        compute_dtype = DTYPE_OF_PRECISION[precision]
        reason = f"training.precision: {precision} (set in the recipe)"
    else:
        reason = f"training.precision: {precision}, quantization.compute_dtype: {compute_dtype} (set in the recipe)"
    return PrecisionChoice(precision, compute_dtype, reason, slow_dtype_notice(precision, compute_dtype, hardware))


def slow_dtype_notice(precision: str, compute_dtype: str, hardware: Hardware) -> str | None:
    if hardware.native_bf16 or "bf16" not in (precision, PRECISION_OF_DTYPE[compute_dtype]):
        return None
    if hardware.kind == "cuda":
        return f"bf16 on {hardware.describe()} is emulated and slow; precision: auto would pick fp16"
    return (
        f"bf16 on {hardware.describe()} runs about 30x slower than fp32 (PyTorch emulates it); "
        "precision: auto would pick fp32"
    )


def resolve_recipe_precision(recipe, hardware: Hardware | None = None):
    """The recipe with concrete precision and compute dtype, and the choice (for logs and the summary)."""
    q, t = recipe.quantization, recipe.training
    hardware = hardware or detect_hardware()
    choice = resolve_precision(t.precision, q.compute_dtype, hardware)
    resolved = recipe.model_copy(
        update={
            "quantization": q.model_copy(update={"compute_dtype": choice.compute_dtype}),
            "training": t.model_copy(update={"precision": choice.precision}),
        }
    )
    return resolved, choice


def with_resolved_precision(recipe, hardware: Hardware | None = None):
    """The recipe unchanged when its dtypes are concrete (a run's resolved recipe), else resolved for hardware."""
    if "auto" not in (recipe.training.precision, recipe.quantization.compute_dtype):
        return recipe
    return resolve_recipe_precision(recipe, hardware)[0]


# What `qlora-pipe plan` assumes on a machine without a GPU: the plan is of GPU memory, for the card
# the recipe targets, and every 24 GB card of the last generations (RTX 3090/4090, A10, L4) runs bf16.
ASSUMED_GPU = Hardware("cuda", "the target GPU", True, "compute capability 8.0+ assumed: no GPU on this machine")


def planning_hardware() -> Hardware:
    """The GPU a memory plan is for: this machine's, or one with native bf16 when there is none."""
    import torch

    return detect_hardware("cuda") if torch.cuda.is_available() else ASSUMED_GPU


def dtype_for_inference(stored: str, hardware: Hardware | None = None) -> str:
    """Load a 16-bit checkpoint in fp32 where 16-bit matmuls are emulated (a CPU without native bf16)."""
    hardware = hardware or detect_hardware()
    if hardware.kind == "cpu" and not hardware.native_bf16 and stored in ("bfloat16", "float16"):
        return "float32"
    return stored


def load_dtype_for(model_dir: Path, hardware: Hardware | None = None):
    """``dtype`` for from_pretrained of a saved model: "auto" (its own), or fp32 where that is emulated here."""
    import json

    import torch

    config = json.loads((Path(model_dir) / "config.json").read_text())
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    chosen = dtype_for_inference(stored, hardware)
    return "auto" if chosen == stored else getattr(torch, chosen)
