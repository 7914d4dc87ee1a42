"""The GGUF check (qlora_pipe/export/gguf_check.py) on files written by the gguf library itself: NaN and
infinity fail it, tensors are compared in row blocks exactly as whole, and the check holds no whole fp32
copy of a large tensor (a 7B's embedding is 2 GiB in fp32)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def write_gguf(path: Path, tensors: dict, quant: str | None = None) -> None:
    """A GGUF written by the gguf library itself (no converter): llama architecture, these tensors."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    for name, array in tensors.items():
        if quant is None:
            writer.add_tensor(name, array.astype(np.float32))
        else:
            qtype = gguf.GGMLQuantizationType[quant]
            with np.errstate(invalid="ignore"):  # a NaN weight makes its block's scale NaN: the case tested
                data = gguf.quants.quantize(array.astype(np.float32), qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(("gguf_type", "quant"), [("f32", None), ("q8_0", "Q8_0")])
def test_a_nan_weight_fails_the_gguf_tensor_check(tmp_path, gguf_type, quant):
    """One NaN among a tensor's weights fails the check and is named (Python's max(x, nan) is x, so a
    running maximum of errors used to forget it and the file passed as bit-equal)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from qlora_pipe.export.gguf_check import check_gguf
    from qlora_pipe.export.gguf_command import failure

    rng = np.random.default_rng(0)
    merged = {"model.embed_tokens.weight": rng.standard_normal((64, 64)), "model.norm.weight": np.ones(64)}
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}))
    save_file({k: torch.from_numpy(v.astype(np.float32)) for k, v in merged.items()}, str(folder / "model.safetensors"))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    good = {names[k]: v for k, v in merged.items()}
    write_gguf(tmp_path / "good.gguf", good, quant)
    result = check_gguf(folder, tmp_path / "good.gguf", gguf_type)
    assert result["passed"] and result["non_finite_tensors"] == [], result
    bad = {**good, "token_embd.weight": good["token_embd.weight"].copy()}
    bad["token_embd.weight"][3, 5] = np.nan
    write_gguf(tmp_path / "bad.gguf", bad, quant)
    result = check_gguf(folder, tmp_path / "bad.gguf", gguf_type)
    assert not result["passed"] and result["non_finite_tensors"] == ["token_embd.weight"]
    assert failure(result) == "tensors holding NaN or infinite values: token_embd.weight"


def test_error_measures_keep_nan_and_infinity_as_failures():
    from qlora_pipe.finite import within, worst

    assert math.isnan(worst(0.0, math.nan)) and math.isnan(worst(math.nan, 1.0)) and worst(0.5, 0.2) == 0.5
    assert not within(math.nan, 1.0) and not within(math.inf, math.inf) and within(0.5, 1.0)


def merged_folder(folder: Path, tensors: dict) -> Path:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}))
    save_file(
        {k: torch.from_numpy(v.astype(np.float32)) for k, v in tensors.items()}, str(folder / "model.safetensors")
    )
    return folder


@pytest.mark.parametrize(("gguf_type", "quant"), [("f32", None), ("q8_0", "Q8_0")])
def test_row_blocks_give_the_whole_tensors_verdict(tmp_path, monkeypatch, gguf_type, quant):
    """Blocks of 5 rows (the last one short) give the same errors as one block, and a change in the last row
    only is still seen."""
    import numpy as np

    from qlora_pipe.export import gguf_check

    rng = np.random.default_rng(1)
    embedding = rng.standard_normal((64, 64))
    folder = merged_folder(tmp_path / "merged", {"model.embed_tokens.weight": embedding})
    changed = embedding.copy()
    changed[63, 60] += 0.5 if quant is None else 5.0
    write_gguf(tmp_path / "good.gguf", {"token_embd.weight": embedding}, quant)
    write_gguf(tmp_path / "changed.gguf", {"token_embd.weight": changed}, quant)
    whole = {name: gguf_check.check_gguf(folder, tmp_path / name, gguf_type) for name in ("good.gguf", "changed.gguf")}
    monkeypatch.setattr(gguf_check, "BLOCK_ELEMENTS", 5 * 64)
    blocks = {name: gguf_check.check_gguf(folder, tmp_path / name, gguf_type) for name in ("good.gguf", "changed.gguf")}
    assert blocks == whole
    assert blocks["good.gguf"]["passed"] and not blocks["changed.gguf"]["passed"]
    if quant is None:
        assert blocks["changed.gguf"]["max_abs_diff_exact_tensors"] == pytest.approx(0.5)


def test_a_shape_that_differs_is_named_not_compared(tmp_path):
    import numpy as np

    from qlora_pipe.export.gguf_check import check_gguf

    folder = merged_folder(tmp_path / "merged", {"model.embed_tokens.weight": np.zeros((64, 64))})
    write_gguf(tmp_path / "short.gguf", {"token_embd.weight": np.zeros((32, 64))})
    result = check_gguf(folder, tmp_path / "short.gguf", "f32")
    assert not result["passed"] and result["unmatched_tensors"] == [
        "token_embd.weight (shape (32, 64), merged (64, 64))"
    ]


def test_the_check_holds_no_whole_fp32_copy_of_a_large_tensor(tmp_path):
    """A 16384 x 2048 embedding (128 MiB in fp32), merged in bf16 and written as f32: the check's anonymous
    memory grows by less than one fp32 copy of it (compared whole: the file's tensor, the merged one and their
    difference in fp32, about four copies)."""
    import torch
    from safetensors.torch import save_file

    rows, cols = 16384, 2048
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}))
    save_file({"model.embed_tokens.weight": weight}, str(folder / "model.safetensors"))
    write_gguf(tmp_path / "big.gguf", {"token_embd.weight": weight.float().numpy()})  # F32
    del weight
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from qlora_pipe.export.gguf_check import check_gguf\n"
        "from qlora_pipe.machine.host_memory import HostMemory, read_status\n"
        "before = read_status()['RssAnon']\n"
        "with HostMemory(interval_s=0.005) as memory:\n"
        "    result = check_gguf(Path(sys.argv[1]), Path(sys.argv[2]), 'f32')\n"
        "print(json.dumps({'passed': result['passed'], 'grown': memory.report()['peak_anonymous_bytes'] - before}))\n"
    )
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", script, str(folder), str(tmp_path / "big.gguf")]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.splitlines()[-1])
    fp32_copy = rows * cols * 4
    assert found["passed"]
    assert found["grown"] < fp32_copy, f"{found['grown'] / 2**20:.0f} MiB grown; one fp32 copy is 128 MiB"


def test_a_failed_conversion_names_its_cause_not_its_progress_bar(tmp_path, monkeypatch):
    """The converter's output can end with a progress bar (a process killed while writing): the reason is the
    signal, or the full disk while the half-written file still fills it, never the bar."""
    from qlora_pipe.export import gguf

    bar = "INFO:hf-to-gguf:Model successfully loaded\nWriting:  79%|███████▊  | 5.59G/7.11G [00:23<00:06, 239Mbyte/s]"
    killed = gguf.conversion_failure(bar, -9, tmp_path)
    assert killed == "the converter was killed by signal SIGKILL (out of memory?)"
    monkeypatch.setattr(gguf, "free_bytes", lambda folder: 1024)  # what the disk had left when the write failed
    full = gguf.conversion_failure(bar, 1, tmp_path)
    assert full.startswith(f"no space left on the device holding {tmp_path}"), full
