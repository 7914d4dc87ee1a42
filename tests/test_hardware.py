"""precision auto follows the hardware (detection faked only at the CPU-flag level), CPU threads follow
what the process may use, and a real fp32 run trains like a bf16 one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from qlora_pipe.errors import UserError
from qlora_pipe.machine.cpu_threads import cgroup_cpu_limit, choose_cpu_threads
from qlora_pipe.machine.hardware import (
    Hardware,
    cpu_hardware,
    cpu_info,
    cuda_hardware,
    detect_hardware,
    dtype_for_inference,
    resolve_precision,
    resolve_recipe_precision,
)

AVX2 = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
SAPPHIRE_RAPIDS = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(AVX2, "fp32"), (AVX512, "fp32"), (AVX512_BF16, "bf16"), (SAPPHIRE_RAPIDS, "bf16"), (AVX2 | {"amx_bf16"}, "bf16")],
)
def test_auto_follows_cpu_flags(make_recipe, flags, expected):
    recipe = make_recipe()
    assert (recipe.training.precision, recipe.quantization.compute_dtype) == ("auto", "auto")
    resolved, choice = resolve_recipe_precision(recipe, cpu_hardware(flags, environ={}))
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[expected]
    assert (resolved.training.precision, resolved.quantization.compute_dtype) == (expected, dtype)
    assert choice.notice is None
    assert ("no native bf16" in choice.reason) == (expected == "fp32")


def test_onednn_isa_cap_disables_native_bf16():
    """ONEDNN_MAX_CPU_ISA=AVX2 makes bf16 as slow as on an AVX2-only CPU (measured: 5.2 s vs 0.04 s fp32)."""
    capped = cpu_hardware(SAPPHIRE_RAPIDS, environ={"ONEDNN_MAX_CPU_ISA": "avx2"})
    assert not capped.native_bf16 and "ONEDNN_MAX_CPU_ISA=AVX2" in capped.detail
    assert cpu_hardware(SAPPHIRE_RAPIDS, environ={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}).native_bf16
    assert resolve_precision("auto", "auto", capped).precision == "fp32"


@pytest.mark.parametrize(
    ("capability", "expected"), [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]
)
def test_auto_follows_gpu_compute_capability(capability, expected):
    choice = resolve_precision("auto", "auto", cuda_hardware(capability, "some GPU"))
    assert choice.precision == expected
    assert choice.compute_dtype == {"fp16": "float16", "bf16": "bfloat16"}[expected]
    assert f"compute capability {capability[0]}.{capability[1]}" in choice.reason


def test_explicit_choices_are_kept_and_the_other_key_follows():
    avx2 = cpu_hardware(AVX2, environ={})
    bf16 = resolve_precision("bf16", "auto", avx2)
    assert (bf16.precision, bf16.compute_dtype) == ("bf16", "bfloat16")
    assert "30x slower" in bf16.notice and "auto would pick fp32" in bf16.notice
    follows = resolve_precision("auto", "float16", cuda_hardware((7, 5), "T4"))
    assert (follows.precision, follows.compute_dtype, follows.notice) == ("fp16", "float16", None)
    mixed = resolve_precision("fp32", "bfloat16", avx2)
    assert (mixed.precision, mixed.compute_dtype) == ("fp32", "bfloat16") and mixed.notice
    old_gpu = resolve_precision("bf16", "auto", cuda_hardware((7, 0), "V100"))
    assert "emulated" in old_gpu.notice
    assert resolve_precision("fp32", "float32", avx2).notice is None


def test_merged_models_load_in_fp32_where_16_bit_is_emulated():
    assert dtype_for_inference("bfloat16", cpu_hardware(AVX2, environ={})) == "float32"
    assert dtype_for_inference("bfloat16", cpu_hardware(SAPPHIRE_RAPIDS, environ={})) == "bfloat16"
    assert dtype_for_inference("bfloat16", Hardware("cuda", "T4", False, "7.5")) == "bfloat16"


def test_this_machine_is_detected_from_its_own_flags():
    info = cpu_info()
    if not info:
        pytest.skip("no /proc/cpuinfo")
    flags = set((info.get("flags") or info.get("Features") or "").split())
    hardware = detect_hardware("cpu")
    assert hardware.native_bf16 == bool(flags & {"avx512_bf16", "amx_bf16"}) or "ONEDNN_MAX_CPU_ISA" in hardware.detail
    assert hardware.name == info.get("model name", hardware.name)


def test_threads_from_environment_recipe_and_available_cpus(monkeypatch):
    assert choose_cpu_threads("auto", {"QLORA_PIPE_CPU_THREADS": "3", "OMP_NUM_THREADS": "1"}).threads == 3
    assert choose_cpu_threads(4, {"QLORA_PIPE_CPU_THREADS": "1"}).threads == 1  # the environment wins
    assert choose_cpu_threads(4, {}).threads == 4
    assert choose_cpu_threads("auto", {"OMP_NUM_THREADS": "1"}).threads == 1
    with pytest.raises(UserError, match="QLORA_PIPE_CPU_THREADS='two'"):
        choose_cpu_threads("auto", {"QLORA_PIPE_CPU_THREADS": "two"})
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr("qlora_pipe.machine.cpu_threads.cgroup_cpu_limit", lambda: None)
    assert choose_cpu_threads("auto", {}).threads == 4
    assert choose_cpu_threads("auto", {"LOCAL_WORLD_SIZE": "2"}).threads == 2
    monkeypatch.setattr("qlora_pipe.machine.cpu_threads.cgroup_cpu_limit", lambda: 1.5)
    choice = choose_cpu_threads("auto", {})
    assert choice.threads == 2 and "cgroup quota of 1.5 CPUs" in choice.reason


def test_cgroup_quota_files(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu/cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu/cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2.0
    (tmp_path / "cpu/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_recipe_rejects_bad_thread_counts(make_recipe):
    with pytest.raises(UserError, match=r"training.cpu_threads: must be at least 1"):
        make_recipe(cpu_threads=0)
    with pytest.raises(UserError, match=r"training.precision"):
        make_recipe(precision="fp8")


def _adapter_dtypes(run_dir) -> set[torch.dtype]:
    with safe_open(str(run_dir / "adapter_model.safetensors"), "pt") as handle:
        return {handle.get_tensor(k).dtype for k in handle.keys()}  # noqa: SIM118


def test_fp32_run_trains_like_bf16(make_recipe, monkeypatch):
    """A real fp32 run (auto on a CPU that reports AVX2 only) against an explicit bf16 run of the same
    recipe: the same data and steps, and losses within 0.5% of each other at every logged step (measured
    on an AMX Xeon: at most 0.009%; bf16 rounds every matmul, so the curves are close, not equal)."""
    from qlora_pipe.training.stage import run_training

    avx2_cpu = {"model name": "an AVX2-only CPU", "flags": " ".join(sorted(AVX2))}
    monkeypatch.setattr("qlora_pipe.machine.hardware.cpu_info", lambda: avx2_cpu)
    fp32_recipe, bf16_recipe = make_recipe(), make_recipe(precision="bf16")
    fp32_recipe.run_name, bf16_recipe.run_name = "fp32", "bf16"
    fp32 = run_training(fp32_recipe)
    bf16 = run_training(bf16_recipe)

    compute = fp32.summary["compute"]
    assert (compute["precision"], compute["compute_dtype"]) == ("fp32", "float32")
    assert "an AVX2-only CPU (no native bf16: AVX2" in compute["reason"] and compute["cpu_threads"] >= 1
    assert (fp32.summary["device"], fp32.summary["cpu_isa"]) == ("an AVX2-only CPU", "AVX2")
    resolved = (fp32.run_dir.root / "recipe.resolved.yaml").read_text()
    assert "precision: fp32" in resolved and "compute_dtype: float32" in resolved
    assert _adapter_dtypes(fp32.run_dir.root) == {torch.float32}  # not TRL's bf16 cast
    assert bf16.summary["compute"]["precision"] == "bf16"
    assert _adapter_dtypes(bf16.run_dir.root) == {torch.bfloat16}

    def losses(result) -> list[float]:
        rows = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    a, b = losses(fp32), losses(bf16)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) / x < 0.005, (a, b)
    assert a[-1] < a[0] and b[-1] < b[0]  # both learn

    # Resumed where bf16 is native, auto would switch the run to bf16: refused, with the difference named.
    amx_cpu = {"model name": "an AMX CPU", "flags": " ".join(sorted(SAPPHIRE_RAPIDS))}
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # set when the suite runs as on an AVX2 CPU
    monkeypatch.setattr("qlora_pipe.machine.hardware.cpu_info", lambda: amx_cpu)
    with pytest.raises(UserError, match=r"training.precision: 'fp32' -> 'bf16'"):
        run_training(fp32_recipe, resume=True)
