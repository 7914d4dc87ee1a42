"""`python -m benchmarks random-model`: a random checkpoint written shard by shard, loaded by transformers."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.random_model import main, random_model
from qlora_pipe.errors import UserError
from qlora_pipe.machine.host_memory import HostMemory, read_status

MB = 10**6
# A qwen2 of about 43 MB (2 MB embeddings, 13 MB a layer): big enough that holding it whole shows in the peak.
SMALL = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 8192,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}


@pytest.fixture
def small_config(tmp_path):
    def write(**changes):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(SMALL | changes))
        return str(path)

    return write


def shard_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(path)
    return tensors


@pytest.mark.skipif(not read_status(), reason="needs Linux's /proc/self/status")
def test_written_shard_by_shard_and_loaded_by_transformers(tmp_path, small_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    config = small_config()
    whole = random_model(tmp_path / "whole", config, 1000 * MB, tokenizer=str(tiny_model_dir))  # imports warmed
    baseline = read_status()["RssAnon"]
    with HostMemory(interval_s=0.002) as memory:
        out = random_model(tmp_path / "sharded", config, 8 * MB, tokenizer=str(tiny_model_dir))
    grown = memory.report()["peak_anonymous_bytes"] - baseline
    assert grown < 20 * MB, f"{grown / MB:.1f} MB above the start for 8 MB shards of a 43 MB model"
    assert not (tmp_path / "sharded.partial").exists()

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 5 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size < 8 * MB + 10_000 for p in shards)  # a shard's tensors and its header
    tensors = shard_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # The same seed, the same bytes, whatever the shard size.
    assert all(torch.equal(tensors[name], other) for name, other in shard_tensors(whole).items())

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(model.state_dict()) == set(tensors) and model.dtype == torch.bfloat16
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(256, dtype=torch.bfloat16))
    assert layer.mlp.up_proj.weight.float().std().item() == pytest.approx(0.02, rel=0.05)
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 4096) and torch.isfinite(logits).all()


def test_refusals_leave_nothing(tmp_path, small_config, tiny_model_dir, capsys):
    tokenizer = str(tiny_model_dir)
    huge = small_config(hidden_size=2**16, intermediate_size=2**18, num_attention_heads=512, num_key_value_heads=512)
    with pytest.raises(UserError, match=r"GB needed for huge, .* GB free"):
        random_model(tmp_path / "huge", huge, 2000 * MB, tokenizer=tokenizer)
    assert not (tmp_path / "huge").exists() and not (tmp_path / "huge.partial").exists()
    with pytest.raises(UserError, match=r"has \d+ tokens, more than the config's vocab_size 100"):
        random_model(tmp_path / "small-vocab", small_config(vocab_size=100), MB, tokenizer=tokenizer)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/keep.txt").write_text("mine")
    assert main([str(tmp_path / "taken"), "--config", small_config(), "--tokenizer", tokenizer]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"random-model: {tmp_path / 'taken'} already exists; remove it or choose another folder"
    ]
    assert (tmp_path / "taken/keep.txt").read_text() == "mine"
    assert main([str(tmp_path / "x"), "--config", "qwen9-1b", "--tokenizer", tokenizer]) == 2
    assert "no bundled config 'qwen9-1b'; choose one of" in capsys.readouterr().err
