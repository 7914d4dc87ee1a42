"""The unmerged export: the dequantized base plus the adapter, served as trained (transformers + PEFT, and
llama.cpp's LoRA GGUF read back with the gguf library); fp16 merges that would overflow are refused."""

from __future__ import annotations

import copy
import json
import math

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_pipe.cli import main
from qlora_pipe.errors import UserError
from qlora_pipe.export.command import export_merged
from qlora_pipe.export.lora_gguf import check_lora_gguf
from qlora_pipe.export.unmerged import export_unmerged, trained_dtype
from qlora_pipe.models.base_record import record_base
from qlora_pipe.recipe import load_recipe
from tests.helpers.export_models import trained_run


def test_base_and_adapter_reproduce_the_trained_model_and_their_gguf_files_check_out(
    tokenizer_dir,
    tmp_path,
    converter,
    monkeypatch,
):
    monkeypatch.setenv("QLORA_PIPE_LLAMA_CPP", str(converter))
    _, result = trained_run("llama", tokenizer_dir, tmp_path, use_rslora=True)
    exported = export_unmerged(result.run_dir.root, gguf_type="auto")
    out = exported.out
    assert out == result.run_dir.root / "unmerged" and not out.with_name("unmerged.partial").exists()

    # base/: the NF4 weights dequantized in fp32, cast once to the dtype the run computed in, nothing added.
    layer = result.model.base_model.model.model.layers[0].self_attn.q_proj
    state = copy.copy(layer.base_layer.weight.quant_state)
    state.dtype = torch.float32
    dense = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, state)
    base = load_file(out / "base" / "model.safetensors")
    dtype = trained_dtype(load_recipe(result.run_dir.resolved_recipe))  # as recorded: fp32 without native bf16
    assert exported.info["dtype"] == dtype
    assert torch.equal(base["model.layers.0.self_attn.q_proj.weight"], dense.to(getattr(torch, dtype)))

    # transformers + PEFT on the two folders: the trained model, to the rounding of its compute dtype.
    fidelity = exported.fidelity
    assert fidelity["passed"] and fidelity["relative_loss_change"] < 1e-3, fidelity
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((out / "base").resolve())

    # The LoRA GGUF: every delta rebuilt from the file (alpha x sqrt(r) for rsLoRA) equals the trained one.
    lora = fidelity["gguf"]["lora"]
    base_gguf = fidelity["gguf"]["base"]
    assert base_gguf["passed"] and base_gguf["exact_tensors"] == base_gguf["tensors"]
    assert lora["passed"] and lora["adapted_weights"] == 2 * 7  # all-linear, 2 layers
    assert lora["alpha"] == pytest.approx(adapter_config["lora_alpha"] * math.sqrt(adapter_config["r"]))
    lora_file = out / "gguf" / lora["file"]
    modelfile = fidelity["gguf"]["ollama_modelfile"]
    if modelfile["written"]:
        text = (out / "gguf" / "Modelfile").read_text()
        assert f"FROM ./{base_gguf['file']}" in text and f"ADAPTER ./{lora['file']}" in text

    # The check fails an adapter file whose scale is not the trained one (plain alpha / r for an rsLoRA run).
    plain = tmp_path / "plain-adapter"
    plain.mkdir()
    save_file(load_file(out / "adapter" / "adapter_model.safetensors"), plain / "adapter_model.safetensors")
    (plain / "adapter_config.json").write_text(json.dumps({**adapter_config, "use_rslora": False}))
    wrong = check_lora_gguf(plain, out / "base", lora_file)
    assert not wrong["passed"] and wrong["max_relative_delta_error"] > 0.5


def test_unmerged_refusals_are_one_line(tokenizer_dir, tmp_path, converter, monkeypatch, capsys):
    monkeypatch.setenv("QLORA_PIPE_LLAMA_CPP", str(converter))
    _, result = trained_run("llama", tokenizer_dir, tmp_path, use_dora=True)
    run = str(result.run_dir.root)
    assert main(["export", run, "--unmerged", "--format", "gguf"]) == 2
    assert "llama.cpp cannot apply this adapter as trained: a DoRA adapter" in capsys.readouterr().err
    assert main(["export", run, "--unmerged", "--merge-base", "original"]) == 2
    assert "--merge-base applies to a merge" in capsys.readouterr().err
    assert not (result.run_dir.root / "unmerged").exists()
    assert not (result.run_dir.root / "unmerged.partial").exists()


def test_a_float16_merge_that_would_overflow_is_refused_naming_the_tensor(tokenizer_dir, tmp_path, monkeypatch):
    recipe, result = trained_run("llama", tokenizer_dir, tmp_path)
    checkpoint = tmp_path / "llama-base" / "model.safetensors"
    tensors = load_file(checkpoint)
    tensors["model.norm.weight"][0] = 7e4  # beyond float16's 65504
    save_file(tensors, checkpoint, metadata={"format": "pt"})
    record_base(result.run_dir, recipe)  # the run stands for one trained on these weights (export checks)
    with pytest.raises(UserError, match=r"model\.norm\.weight holds 7\.0\d*e\+04, beyond float16's largest value"):
        export_merged(result.run_dir.root, dtype="float16", verify=False)
    assert not (result.run_dir.root / "merged").exists()
    # Weights that fit float16 but activations that do not (as Gemma 3 270M's fp16 merge measured: NaN logits):
    # the check, which runs the merged model in its own dtype, names the overflow.
    tensors["model.norm.weight"][:] = 6e4  # fits float16; the logits it scales do not
    save_file(tensors, checkpoint, metadata={"format": "pt"})
    record_base(result.run_dir, recipe)
    with pytest.raises(UserError, match=r"activations overflow float16 .*export bfloat16 or float32"):
        export_merged(result.run_dir.root, dtype="float16")
    assert not (result.run_dir.root / "merged").exists()
    # Where the CPU checks float16 weights in fp32 (no native 16-bit matmuls, as when oneDNN is capped at AVX2),
    # the largest activation is watched instead, and named.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    with pytest.raises(UserError, match=r"activations overflow float16"):
        export_merged(result.run_dir.root, dtype="float16")
    fidelity = json.loads((result.run_dir.root / "merged.partial" / "fidelity.json").read_text())
    assert fidelity["float16_overflow"]["largest_activation"] > 65504 and fidelity["float16_overflow"]["module"]
