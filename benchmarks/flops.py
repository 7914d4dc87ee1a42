"""Honest FLOPs for QLoRA training, and the peak bf16 FLOPs of exact GPU models.

Model FLOPs per token (the work the training step must do, without recompute), counting a multiply-add
as 2 FLOPs:

    frozen linear weights (out x in), 4-bit or not:  forward 2*in*out + input gradient 2*in*out
                                                     (no weight gradient: the base is frozen)
    LoRA adapter of rank r on such a layer:          forward, input gradient and weight gradient,
                                                     each 2*r*(in + out): 6*r*(in + out)
    lm_head (vocab x hidden, frozen):                4*hidden*vocab
    attention scores and values, per layer:          forward 4*T*hidden (QK^T and AV over the T positions
                                                     of the sequence), backward twice that: 12*T*hidden
                                                     (PaLM's convention: not halved for the causal mask)
    embedding lookup, norms, activations:            0 (not matmuls)

Hardware FLOPs add what gradient checkpointing recomputes: the forward pass of every decoder layer
again (2*in*out per frozen weight, 2*r*(in + out) per adapter, 4*T*hidden of attention per layer).

The common 6*N per token counts a weight gradient for every parameter, the embedding included; for
QLoRA, whose base gets no weight gradient, it overstates the work by about 1.5x on Llama-3.1-8B.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, keyed by the exact name
# torch.cuda.get_device_name() reports: an H100 PCIe is not an H100 SXM, an H200 NVL not an H200.
PEAK_BF16_FLOPS = {
    "NVIDIA H200": 989.4e12,
    "NVIDIA H200 NVL": 835.5e12,
    "NVIDIA H100 80GB HBM3": 989.4e12,
    "NVIDIA H100 PCIe": 756.5e12,
    "NVIDIA H100 NVL": 835.5e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362.1e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10G": 70e12,
    "NVIDIA GeForce RTX 4090": 165.2e12,
    "NVIDIA GeForce RTX 3090": 71e12,
}


def peak_bf16_flops_of(device_name: str) -> float | None:
    """The peak for this exact device name, or None (unknown variants are never guessed by substring)."""
    return PEAK_BF16_FLOPS.get(device_name.strip())


@dataclass(frozen=True)
class TransformerShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_linears(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's linear weights: q, k, v, o, gate, up, down."""
        d, kv = self.hidden, self.kv_heads * self.head_dim
        return [
            (d, d),
            (d, kv),
            (d, kv),
            (d, d),
            (d, self.intermediate),
            (d, self.intermediate),
            (self.intermediate, d),
        ]

    @classmethod
    def from_config(cls, config) -> TransformerShape:
        return cls(
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            config.vocab_size,
        )


def qlora_flops_per_token(shape: TransformerShape, rank: int, seq_len: int) -> dict[str, float]:
    """Model FLOPs per token of a QLoRA step (LoRA on every linear layer of every decoder layer), and the
    hardware FLOPs with the recompute of gradient checkpointing."""
    linears = shape.layer_linears() * shape.layers
    frozen = sum(4 * i * o for i, o in linears)
    lora = sum(6 * rank * (i + o) for i, o in linears)
    head = 4 * shape.hidden * shape.vocab
    attention = 12 * seq_len * shape.hidden * shape.layers
    model = frozen + lora + head + attention
    recompute = sum(2 * i * o + 2 * rank * (i + o) for i, o in linears) + 4 * seq_len * shape.hidden * shape.layers
    return {
        "frozen_linears": frozen,
        "lora": lora,
        "lm_head": head,
        "attention": attention,
        "model": model,
        "hardware_with_recompute": model + recompute,
    }


def six_n_per_token(total_params: int) -> int:
    """The 6*N convention (every parameter gets a weight gradient), for comparison only."""
    return 6 * total_params
