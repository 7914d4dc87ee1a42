"""The streaming export never holds the whole model, nor a whole shard of its base or of its output: its
peak memory is flat in the number of layers and in the shard sizes, and its tensors are the bytes of a
plain whole-tensor merge."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.helpers.export_models import finished_run

REPO = Path(__file__).resolve().parents[1]
MEASURE = "import resource, subprocess, sys; subprocess.check_call(sys.argv[1:]); " + (
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
)


def one_shard_copy(run: Path, folder: Path) -> Path:
    """The same run over the same base saved as one safetensors file."""
    recipe = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    base = Path(recipe["model"]["name_or_path"])
    new_base, new_run = folder / "base", folder / "runs" / "run"
    shutil.copytree(base, new_base, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = {}
    for shard in sorted(base.glob("*.safetensors")):
        tensors.update(load_file(shard))
    save_file(tensors, new_base / "model.safetensors", metadata={"format": "pt"})
    del tensors
    shutil.copytree(run, new_run)
    recipe.update(output_dir=str(folder / "runs"), model={"name_or_path": str(new_base)})
    (new_run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    return new_run


def export_peak(run: Path) -> int:
    command = [sys.executable, "-m", "qlora_pipe.cli", "export", str(run)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_peak_memory_is_flat_in_layers_and_in_shard_sizes(tiny_model_dir, tmp_path):
    small_run, small = finished_run(tmp_path / "small", 8, tiny_model_dir)  # several base shards already
    large_run, large = finished_run(tmp_path / "large", 40, tiny_model_dir)
    one_shard_run = one_shard_copy(large_run, tmp_path / "one-shard")
    assert large - small > 150 * 2**20  # large enough to tell
    small_peak, large_peak, one_shard_peak = (export_peak(r) for r in (small_run, large_run, one_shard_run))
    mib = 2**20
    print(f"export peaks: 8 layers {small_peak / mib:.0f} MiB, 40 layers {large_peak / mib:.0f} MiB, "
          f"40 layers from one base shard {one_shard_peak / mib:.0f} MiB; model {large / mib:.0f} MiB")  # fmt: skip
    # Holding the model, a base shard or the output shard (one file: the default 5 GB limit) would add at least
    # the difference in size; streaming adds the adapter's few MiB and noise.
    assert large_peak - small_peak < 0.1 * (large - small), f"grew {(large_peak - small_peak) / mib:.0f} MiB"
    assert abs(one_shard_peak - large_peak) < 0.1 * large, f"one base shard: {one_shard_peak / mib:.0f} MiB"
    merged = large_run / "merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "model.safetensors.index.json").exists()


def test_streamed_tensors_are_the_bytes_of_a_whole_tensor_merge(tiny_model_dir, tmp_path, monkeypatch):
    """Reference: every tensor loaded whole, dequant(NF4(W)) by bitsandbytes, W + (scale * (B @ A)) in fp32,
    one cast; the export reads, merges and writes in pieces (blocks of 64 rows here) and across small output
    shards."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from qlora_pipe.export import row_blocks
    from qlora_pipe.export.command import export_merged

    monkeypatch.setattr(row_blocks, "BLOCK_ELEMENTS", 64 * 512)
    assert row_blocks.row_starts(1408, 512, 64) == list(range(0, 1408, 64))
    assert row_blocks.row_starts(1440, 512, 64) == list(range(0, 1408, 64))  # 32 rows left: the last block has 96
    run, _ = finished_run(tmp_path / "model", 2, tiny_model_dir)
    out = export_merged(run, tmp_path / "merged", max_shard_size="3MB").out
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 3
    base = Path(yaml.safe_load((run / "recipe.resolved.yaml").read_text())["model"]["name_or_path"])
    weights = {k: v for shard in sorted(base.glob("*.safetensors")) for k, v in load_file(shard).items()}
    adapter = load_file(run / "adapter_model.safetensors")
    scale = 8 / 8  # lora_alpha / r
    for name, weight in weights.items():
        expected = weight
        if name.endswith("_proj.weight"):  # every linear but lm_head is 4-bit in training
            param = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
            param = param.to("cpu")
            state = copy.copy(param.quant_state)  # the exact NF4 values: dequantized in fp32
            state.dtype = torch.float32
            dense = bnb.functional.dequantize_4bit(param.data, state)
            module = "base_model.model." + name.removesuffix(".weight")
            delta = adapter[f"{module}.lora_B.weight"].float() @ adapter[f"{module}.lora_A.weight"].float()
            expected = (dense + scale * delta).to(torch.bfloat16)
        with safe_open(str(out / index[name]), framework="pt") as handle:
            written = handle.get_tensor(name)
        assert written.dtype == expected.dtype and torch.equal(written.view(torch.int16), expected.view(torch.int16)), (
            name
        )
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers reads the streamed shards
    assert model.dtype == torch.bfloat16 and len(list(model.parameters())) > 0


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_nf4_rows_are_the_bits_of_the_whole_weight(double_quant, storage):
    """compat NF4Rows: quantized and dequantized a block of rows at a time (odd widths too), the bits of
    bitsandbytes' Params4bit quantizing the whole weight and dequantizing it in fp32."""
    from qlora_pipe.compat.bitsandbytes import NF4Rows, dequantized_fp32, quantized_like_loading
    from qlora_pipe.export.row_blocks import row_starts

    torch.manual_seed(0)
    for rows, columns in ((1408, 512), (512, 1408), (200, 96), (136, 334)):
        weight = torch.randn(rows, columns) * 0.02
        whole = dequantized_fp32(quantized_like_loading(weight, "nf4", double_quant, storage))
        nf4 = NF4Rows("nf4", double_quant)
        starts = row_starts(rows, columns, nf4.blocksize)
        for start, stop in zip(starts, [*starts[1:], rows], strict=True):
            nf4.add(weight[start:stop])
        nf4.finish()
        assert torch.equal(torch.cat([nf4.rows(i) for i in range(len(starts))]), whole), (rows, columns)


def test_dora_rows_are_the_bits_of_the_whole_merge():
    """W + scale * B @ A rescaled per row to DoRA's magnitude, a block of rows at a time = the whole-weight merge."""
    from qlora_pipe.export.merge import LoraWeights, merge_tensor
    from qlora_pipe.export.row_blocks import merged_rows

    torch.manual_seed(0)
    weight = torch.randn(1408, 512) * 0.02
    lora = LoraWeights(torch.randn(16, 512) * 0.01, torch.randn(1408, 16) * 0.01, 2.0, torch.rand(1408) + 0.5)
    whole = merge_tensor(weight.clone(), lora, transposed=False)
    blocks = [merged_rows(weight[a : a + 128].clone(), lora, a) for a in range(0, 1408, 128)]
    assert torch.equal(torch.cat(blocks), whole)


def test_merging_a_large_weight_needs_no_whole_fp32_copy_of_it(tiny_model_dir, tmp_path):
    """One process exports a small run (the libraries loaded), resets its peak resident size, exports a run of the
    same small shapes, then one whose MLP weights are 4096 x 2048 (32 MiB each in fp32), and reads the peak each
    time: what the large weights add stays under one fp32 copy of one of them (9 MiB measured). Merged whole,
    the quantizer's temporaries, the dequantized weight, the delta and the copy the share kept is measured
    against added about six copies (192 MiB)."""
    small, _ = finished_run(tmp_path / "small", 1, tiny_model_dir)
    again, _ = finished_run(tmp_path / "again", 1, tiny_model_dir)
    large, _ = finished_run(tmp_path / "large", 1, tiny_model_dir, hidden=2048, intermediate=4096)
    script = (
        "import sys\n"
        "from qlora_pipe.export.command import export_merged\n"
        "def kib(key):\n"
        "    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(key))\n"
        "export_merged(sys.argv[1], sys.argv[1] + '-merged')\n"
        "for run in sys.argv[2:]:\n"
        "    open('/proc/self/clear_refs', 'w').write('5')  # the peak resident size starts again from here\n"
        "    start = kib('VmRSS:')\n"
        "    export_merged(run, run + '-merged')\n"
        "    print('grown KiB', kib('VmHWM:') - start)\n"
    )
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    runs = [str(run) for run in (small, again, large)]
    out = subprocess.run([sys.executable, "-c", script, *runs], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    grown = [int(line.split()[-1]) * 1024 for line in out.stdout.splitlines() if line.startswith("grown KiB")]
    same_shapes, large_shapes = grown
    fp32_copy = 4096 * 2048 * 4
    added = large_shapes - same_shapes
    assert added < fp32_copy, f"{added / 2**20:.0f} MiB for the large weights, one fp32 copy is 32 MiB"
