"""Model stage: a real 4-bit NF4 base (double quantization), frozen, with only LoRA trainable."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from qlora_pipe.errors import UserError
from qlora_pipe.models.loading import load_base_model, load_tokenizer, load_trainable_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def expected_lora_params(config, r: int, targets=PROJECTIONS) -> int:
    """r * (in + out) for every adapted linear layer, computed from the model config alone."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    per_layer = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
    return per_layer * config.num_hidden_layers


def test_base_linear_layers_are_nf4_with_double_quant(make_recipe):
    recipe = make_recipe()
    model = load_base_model(recipe)
    layers = [m for n, m in model.named_modules() if n.endswith(PROJECTIONS)]
    assert layers and all(isinstance(m, bnb.nn.Linear4bit) for m in layers)
    for layer in layers:
        state = layer.weight.quant_state
        assert state.quant_type == "nf4"
        assert state.nested, "double quantization must be on by default"
        assert layer.weight.dtype == torch.uint8
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)


def test_only_lora_parameters_train_and_count_matches_config(make_recipe):
    recipe = make_recipe()
    _, trainable = load_trainable_model(recipe)
    model = trainable.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    config = model.base_model.model.config
    expected = expected_lora_params(config, r=recipe.lora.r)
    assert trainable.trainable_params == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_target_module_list_and_modules_to_save(make_recipe):
    recipe = make_recipe(lora={"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]})
    _, trainable = load_trainable_model(recipe)
    config = trainable.model.base_model.model.config
    lm_head = config.hidden_size * config.vocab_size
    assert trainable.trainable_params == expected_lora_params(config, 8, ("q_proj", "v_proj")) + lm_head


def test_rslora_and_dora_are_passed_to_peft(make_recipe):
    recipe = make_recipe(lora={"use_rslora": True, "use_dora": True})
    _, trainable = load_trainable_model(recipe)
    config = trainable.model.peft_config["default"]
    assert config.use_rslora and config.use_dora
    assert any("lora_magnitude_vector" in n for n, _ in trainable.model.named_parameters())


def test_quantization_disabled_gives_16bit_lora(make_recipe):
    recipe = make_recipe(quantization={"enabled": False, "compute_dtype": "bfloat16"})
    _, trainable = load_trainable_model(recipe)
    base = trainable.model.base_model.model
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.bfloat16
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())


def test_target_modules_matching_nothing_fail_before_training(make_recipe):
    recipe = make_recipe(lora={"target_modules": ["q_proj", "qkv_proj"]})
    with pytest.raises(UserError, match=r"lora\.target_modules: qkv_proj match no linear layer.*q_proj"):
        load_trainable_model(recipe)


def test_pad_token_is_never_eos(make_recipe):
    tokenizer = load_tokenizer(make_recipe())
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_missing_model_directory(make_recipe, tmp_path):
    recipe = make_recipe()
    recipe.model.name_or_path = str(tmp_path / "no-such-model")
    with pytest.raises(UserError, match=r"model\.name_or_path: directory not found"):
        load_tokenizer(recipe)


def test_evaluation_does_not_alter_the_4bit_base(make_recipe):
    """The CPU inference fast path of bitsandbytes must not repack (and lossily change) the base."""
    recipe = make_recipe(quantization={"compute_dtype": "float32"})
    _, trainable = load_trainable_model(recipe)
    model = trainable.model
    ids = torch.arange(40).view(2, 20) + 5
    model.train()
    before = model(input_ids=ids, labels=ids).loss.item()
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids, labels=ids).loss.item()
    model.train()
    after = model(input_ids=ids, labels=ids).loss.item()
    assert before == evaluated == after


def test_an_fp32_model_keeps_its_input_embedding_in_the_stored_bf16_exactly(make_recipe, tiny_model_dir, tmp_path):
    """On an fp32-compute host the untied input embedding stays in the checkpoint's bf16 (half the bytes) and
    the model computes exactly what the all-fp32 load of transformers computes; a value bf16 cannot hold, a
    tied embedding and an embedding trained in full stay fp32."""
    from transformers import AutoModelForCausalLM

    from qlora_pipe.compat.transformers import tensors_loaded_as
    from qlora_pipe.models.embedding_storage import keep_input_embedding_stored, stored_embedding_dtypes
    from qlora_pipe.models.loading import quantization_config

    recipe = make_recipe(precision="fp32")
    model = load_base_model(recipe)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.float32
    plain = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, quantization_config=quantization_config(recipe), device_map={"": "cpu"}
    )
    assert plain.get_input_embeddings().weight.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 42, 7, 300]])
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)

    trained = make_recipe(precision="fp32", lora={"modules_to_save": ["embed_tokens"]})
    assert load_base_model(trained).get_input_embeddings().weight.dtype == torch.float32

    # The checkpoint's bf16 embedding is read as bf16 (no fp32 copy while loading); an fp32 checkpoint's is not.
    assert stored_embedding_dtypes(str(tiny_model_dir), []) == {"model.embed_tokens.weight": torch.bfloat16}
    assert stored_embedding_dtypes(str(tiny_model_dir), ["embed_tokens"]) == {}
    with tensors_loaded_as(stored_embedding_dtypes(str(tiny_model_dir), [])):
        read = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert read.get_input_embeddings().weight.dtype == torch.bfloat16
    assert read.get_output_embeddings().weight.dtype == torch.float32
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).save_pretrained(tmp_path / "fp32")
    assert stored_embedding_dtypes(str(tmp_path / "fp32"), []) == {}
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1)
    LlamaForCausalLM(LlamaConfig(**dims, tie_word_embeddings=True)).to(torch.bfloat16).save_pretrained(tmp_path / "t")
    assert stored_embedding_dtypes(str(tmp_path / "t"), []) == {}  # tied only once loaded: the lm_head's matrix

    with torch.no_grad():
        plain.get_input_embeddings().weight[3, 0] = 1.0 + 2**-20  # not a bf16 or an fp16 value
    assert keep_input_embedding_stored(plain, []) is None
    assert plain.get_input_embeddings().weight.dtype == torch.float32
    plain.lm_head.weight = plain.get_input_embeddings().weight
    with torch.no_grad():
        plain.get_input_embeddings().weight[3, 0] = 1.0
    assert keep_input_embedding_stored(plain, []) is None
