"""Export: merged weights equal dequant(NF4(W)) + scale*B@A, for several architectures; the result
reloads with plain transformers, carries its tokenizer and configs, and passes verification."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_pipe.errors import UserError
from qlora_pipe.export.command import export_merged
from qlora_pipe.export.gguf_command import export_gguf, gguf_table
from qlora_pipe.export.serving import serving_template
from qlora_pipe.runs import RunDir
from tests.helpers.export_models import ARCHITECTURES, trained_run


def expected_weights(result, conv1d: bool) -> dict[str, torch.Tensor]:
    """dequant(NF4(W)) from the model as loaded for training + scale * B @ A from the trained model, in fp32."""
    expected = {}
    for name, module in result.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            base = module.base_layer
            weight = base.weight
            if isinstance(base, bnb.nn.Linear4bit):  # the exact NF4 values: dequantized in fp32
                state = copy.copy(weight.quant_state)
                state.dtype = torch.float32
                dense = bnb.functional.dequantize_4bit(weight.data, state)
            else:
                dense = weight.float()
            key = name.removeprefix("base_model.model.") + ".weight"
            delta = module.scaling["default"] * (
                module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()
            )
            merged = dense + delta  # (out, in) as the 4-bit layer holds it
            expected[key] = merged.T if conv1d else merged  # GPT-2 checkpoints store Conv1D weights (in, out)
    return expected


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_merge_is_faithful_and_reloads_with_plain_transformers(kind, tokenizer_dir, tmp_path, converter):
    _, result = trained_run(kind, tokenizer_dir, tmp_path)
    expected = expected_weights(result, conv1d=kind == "gpt2")
    assert expected, "no LoRA layers found"

    exact = export_merged(result.run_dir.root, tmp_path / "merged32", dtype="float32", verify=False)
    with safe_open(str(exact.out / "model.safetensors"), framework="pt") as handle:
        for key, value in expected.items():
            torch.testing.assert_close(handle.get_tensor(key), value, atol=1e-5, rtol=1e-5)

    exported = export_merged(result.run_dir.root, compare_original=kind == "llama")  # defaults: bf16, verified
    out = exported.out
    assert out == result.run_dir.root / "merged" and exported.fidelity["passed"]
    fidelity = json.loads((out / "fidelity.json").read_text())
    assert fidelity["relative_loss_change"] <= 0.01 and fidelity["relative_logit_diff"] <= 0.02
    if kind == "llama":  # the 16-bit merge base is further from the trained model than the NF4 one
        original = fidelity["original_merge_base"]
        assert original["mean_abs_logit_diff"] > 2 * fidelity["mean_abs_logit_diff"]
        assert not list(out.parent.glob("*.original"))
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and "quantization_config" not in config
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}  # noqa: SIM118
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == serving_template(result.tokenizer.chat_template)  # no {% generation %}
    generation = json.loads((out / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])

    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no peft, no bitsandbytes
    assert model.dtype == torch.bfloat16
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is a tort?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]

    # The same folder as GGUF through llama.cpp's converter, read back tensor by tensor (16-bit: bit-equal).
    if kind in ("gemma", "phi3"):  # their converter classes read a SentencePiece file this tiny model lacks
        with pytest.raises(UserError, match=r"SentencePiece tokenizer\.model, which the model does not have"):
            export_gguf(RunDir(result.run_dir.root), out, "f16")
        assert not list((result.run_dir.root / "gguf").glob("*.gguf*"))
        return
    gguf = export_gguf(RunDir(result.run_dir.root), out, "f16")
    assert gguf["passed"] and gguf["exact_tensors"] == gguf["tensors"] and not gguf["unmatched_tensors"]
    assert gguf["eos_token_id"] == tokenizer.eos_token_id and gguf["chat_template_is_serving_template"]
    assert json.loads((out / "fidelity.json").read_text())["gguf"]["f16"]["passed"]
    # Each step's host peak: the converter's (its own process, reported on its last line) and the check's
    memory = gguf["host_memory"]
    assert memory["converter"]["peak_anonymous_bytes"] > 0 and memory["check"]["peak_anonymous_bytes"] > 0
    assert "host memory: converter peak" in gguf_table(gguf)
    assert gguf["seconds"]["convert"] > 0 and gguf["seconds"]["check"] >= 0  # a tiny check rounds to 0.0 s
    if kind == "llama":  # quantized: every matrix within q8_0's rounding, norms still bit-equal
        q8 = export_gguf(RunDir(result.run_dir.root), out, "q8_0")
        assert q8["passed"] and q8["quantized_tensors"] > 0 and q8["exact_tensors"] > 0
        assert 0 < q8["max_relative_quantization_error"] <= 0.005
        assert (result.run_dir.root / "gguf/Modelfile").is_file()


def test_rslora_dora_and_modules_to_save_are_merged(tokenizer_dir, tmp_path):
    _, result = trained_run(
        "llama", tokenizer_dir, tmp_path, use_rslora=True, use_dora=True, modules_to_save=["lm_head"]
    )
    exact = export_merged(result.run_dir.root, tmp_path / "merged32", dtype="float32", verify=False)
    peft_model = result.model
    with safe_open(str(exact.out / "model.safetensors"), framework="pt") as handle:
        # DoRA: PEFT's own merge of the dequantized weight is the reference.
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        state = copy.copy(layer.base_layer.weight.quant_state)  # the exact NF4 values: dequantized in fp32
        state.dtype = torch.float32
        dense = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, state)
        delta = layer.scaling["default"] * (
            layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
        )
        combined = dense.float() + delta
        norm = combined.norm(p=2, dim=1, keepdim=True)
        magnitude = layer.lora_magnitude_vector["default"].weight.float().view(-1, 1)
        torch.testing.assert_close(
            handle.get_tensor("model.layers.0.self_attn.q_proj.weight"),
            magnitude / norm * combined,
            atol=1e-5,
            rtol=1e-5,
        )
        trained_head = peft_model.base_model.model.lm_head.modules_to_save["default"].weight.float()
        torch.testing.assert_close(handle.get_tensor("lm_head.weight"), trained_head)
    assert json.loads(result.run_dir.adapter_config.read_text())["use_rslora"] is True
    assert export_merged(result.run_dir.root).fidelity["passed"]


def test_export_errors_leave_nothing_that_looks_complete(tokenizer_dir, tmp_path):
    _, result = trained_run("llama", tokenizer_dir, tmp_path)
    run = result.run_dir
    weights = run.adapter_weights.read_bytes()
    run.adapter_weights.write_bytes(weights[:100])
    with pytest.raises(UserError, match="unreadable adapter"):
        export_merged(run.root)
    assert not (run.root / "merged").exists() and not (run.root / "merged.partial").exists()
    run.adapter_weights.unlink()
    with pytest.raises(UserError, match="no adapter"):
        export_merged(run.root)
    run.adapter_weights.write_bytes(weights)
    shutil.rmtree(tmp_path / "llama-base")
    with pytest.raises(UserError, match="base model not found"):
        export_merged(run.root)
    with pytest.raises(UserError, match="run directory not found"):
        export_merged(tmp_path / "nope")
    unfinished = tmp_path / "runs" / "unfinished"
    unfinished.mkdir()
    with pytest.raises(UserError, match="not a finished run"):
        export_merged(unfinished)


def test_export_never_deletes_what_it_did_not_write(tokenizer_dir, tmp_path):
    """--out on a folder of the user's, or on the run directory itself, is refused and nothing is touched;
    an earlier export of ours is replaced."""
    _, result = trained_run("llama", tokenizer_dir, tmp_path)
    run = result.run_dir
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "thesis.txt").write_text("irreplaceable")
    with pytest.raises(UserError, match=r"my-folder: the folder holds files that are not a merged model"):
        export_merged(run.root, mine, verify=False)
    assert (mine / "thesis.txt").read_text() == "irreplaceable" and sorted(p.name for p in mine.iterdir()) == [
        "thesis.txt"
    ]
    before = sorted(p.name for p in run.root.iterdir())
    with pytest.raises(UserError, match=r"not a merged model qlora-pipe wrote"):
        export_merged(run.root, run.root, verify=False)
    assert sorted(p.name for p in run.root.iterdir()) == before and run.adapter_weights.is_file()
    squatter = tmp_path / "out.partial"
    squatter.mkdir()
    (squatter / "keep.txt").write_text("x")
    with pytest.raises(UserError, match=r"out.partial is in the way and was not written by qlora-pipe"):
        export_merged(run.root, tmp_path / "out", verify=False)
    assert (squatter / "keep.txt").is_file()
    first = export_merged(run.root, tmp_path / "again", verify=False)
    second = export_merged(run.root, tmp_path / "again", verify=False)  # our own export: replaced
    assert first.out == second.out and (second.out / "export_info.json").is_file()
    assert not (second.out / ".qlora-pipe-export").exists()


def test_export_takes_back_its_own_leftovers_and_runs_one_at_a_time(tokenizer_dir, tmp_path):
    """kill -9 between the marker's removal and the final rename leaves a verified `.partial` without its
    marker (and the old export gone, or still there): the next export recognises it as its own and
    replaces it. Two exports of one run at once: the second is refused in one line naming the first's pid,
    and the first finishes with a merged model that loads, having said nothing but its own lines (on a CPU
    where bitsandbytes looks for its Hub kernel at import)."""
    import os
    import subprocess
    import sys
    import time

    from tests.helpers.cli import ENV
    from tests.helpers.terminal import avx512_bf16_site, library_noise

    _, result = trained_run("llama", tokenizer_dir, tmp_path)
    run = result.run_dir
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    export_merged(run.root, out, verify=False)
    shutil.copytree(out, partial)  # killed before the old export was removed: both are there
    assert not (partial / ".qlora-pipe-export").exists() and (partial / "export_info.json").is_file()
    export_merged(run.root, out, verify=False)
    assert not partial.exists() and (out / "export_info.json").is_file()
    out.rename(partial)  # killed after the old export was removed, before the rename
    export_merged(run.root, out, verify=False)
    assert not partial.exists() and (out / "model.safetensors").is_file()

    site = avx512_bf16_site(tmp_path)  # where bitsandbytes looks for its Hub kernel at import
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).resolve().parents[1])])}
    first = subprocess.Popen(
        [sys.executable, "-m", "qlora_pipe.cli", "export", str(run.root)], env=env, stderr=subprocess.PIPE, text=True
    )
    lock = run.root.parent / f".{run.root.name}.export.lock"
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text().strip() == f"pid {first.pid}") and first.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    assert first.poll() is None, first.stderr.read()[-2000:]
    # In this process, at once (a second CLI process would spend seconds importing first).
    with pytest.raises(UserError, match=rf"is being exported by another process \(pid {first.pid}\); wait"):
        export_merged(run.root)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    said = first.stderr.read()
    assert "merging: " in said and not library_noise(said), said[-2000:]  # the tool's lines only
    merged = AutoModelForCausalLM.from_pretrained(run.root / "merged")
    assert merged.config.num_hidden_layers == 2 and not (run.root / "merged.partial").exists()
    assert os.path.getsize(run.root / "merged" / "model.safetensors") > 0
