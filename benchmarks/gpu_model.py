"""A random-weight Llama built directly in 4-bit NF4, one linear layer at a time, for benchmarks/gpu.py.

Loading Llama-3.1-8B through from_pretrained would need the 16 GB checkpoint (a download, or a
random one written and read back). Instead each decoder layer is created on the meta device, each
of its linear weights is drawn in bf16 on the target device and quantized at once by bitsandbytes
(Params4bit.to), so at most one bf16 matrix (the 14336 x 4096 MLP: 117 MB) exists at a time. The
result carries the attributes PEFT and TRL read to treat a model as 4-bit (is_loaded_in_4bit).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Measured elsewhere, for comparison beside ours (their settings, not ours).
REFERENCES = {
    "torchtune_llama3.1_8b_qlora_rtx4090": {
        "tokens_per_second": 2413,
        "peak_memory_gib": 7.4,
        "settings": "batch 2, packed 2k sequences, r=8, torch.compile",
    },
    "unsloth_llama3.1_8b_qlora_longest_context_24gb": {
        "tokens": 78475,
        "hf_fa2_tokens": 5789,
        "settings": "batch 1, r=32, all linear layers",
    },
}


def peak_bf16_flops() -> float | None:
    """This GPU's dense bf16 peak, by its exact name (benchmarks/flops.py); None without a GPU or for an
    unknown variant."""
    if not torch.cuda.is_available():
        return None
    from benchmarks.flops import peak_bf16_flops_of

    return peak_bf16_flops_of(torch.cuda.get_device_name())


def llama_config(dry: bool = False):
    """Llama-3.1-8B's shape; dry: a tiny model of the same family (dims multiples of 64 for bitsandbytes on CPU)."""
    from transformers import LlamaConfig

    if dry:
        return LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


def quantized_linear(linear: nn.Linear, device: torch.device, std: float) -> nn.Module:
    """A bitsandbytes Linear4bit (NF4, double quant, bf16 compute) with random weights drawn on ``device``."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=False,
        compute_dtype=torch.bfloat16,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=torch.uint8,
        device="meta",
    )
    weight = torch.randn(linear.out_features, linear.in_features, device=device, dtype=torch.bfloat16) * std
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, module=layer
    ).to(device)
    return layer


def materialize(module: nn.Module, device: torch.device, std: float) -> None:
    """Give every parameter still on meta real values: norms get ones, matrices (embedding, head) N(0, std)."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.is_meta:
                value = torch.ones if param.dim() == 1 else lambda *s, **k: torch.randn(*s, **k) * std
                sub._parameters[name] = nn.Parameter(
                    value(param.shape, device=device, dtype=torch.bfloat16), requires_grad=False
                )


def build_4bit_llama(config, device: torch.device) -> nn.Module:
    """LlamaForCausalLM with NF4 linear layers (lm_head stays bf16, as transformers does), built in place."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    std = 1 / math.sqrt(config.hidden_size)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, quantized_linear(child, device, std))
    materialize(model, device, std)
    with torch.device(device):  # computed in __init__, so it must not stay on meta
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"still on the meta device: {leftovers[:5]}")
    # What from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True)) sets and PEFT/TRL read.
    model.is_loaded_in_4bit = True
    model.is_loaded_in_8bit = False
    model.generation_config.pad_token_id = 0
    return model.eval()
