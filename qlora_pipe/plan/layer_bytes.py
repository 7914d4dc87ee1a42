"""Per decoder layer, per token: what autograd saves for backward and what a layer adds while it runs backward.

Counted per module with ``torch.autograd.graph.saved_tensors_hooks`` on tiny Llama models in fp32 and in bf16
(the adapter in bf16, as TRL trains a 4-bit model), with and without LoRA dropout, tiled MLP and not; and
checked against whole CPU steps of SmolLM2-135M at 4k and 8k tokens (tests/test_plan.py,
docs/long-context.md). Also the host memory activation offloading pins.
"""

from __future__ import annotations

from qlora_pipe.plan.settings import PlanSettings
from qlora_pipe.plan.shapes import Linear, ModelShape
from qlora_pipe.recipe.lora_targets import is_target


def adapted_linears(linears: list[Linear], targets: list[str] | str) -> list[Linear]:
    """The linear layers LoRA wraps: all of them for 'all-linear', else those whose name ends a target."""
    if targets == "all-linear":
        return list(linears)
    return [lin for lin in linears if is_target(lin.name, targets)]


def lora_param_bytes(s: PlanSettings) -> int:
    """TRL casts the adapter of a 4-bit model to bf16 when training in bf16; otherwise PEFT keeps it in fp32."""
    return 2 if s.quantized and s.precision == "bf16" else 4


OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "dense", "c_proj", "wo", "w2", "fc2", "dense_4h_to_h")


def _input_of(lin: Linear) -> tuple[str, bool]:
    """Which tensor a linear layer reads: its block's input (shared: q/k/v, gate/up) or its own (o, down)."""
    block = "mlp" if ".mlp." in lin.name else "attn"
    own = lin.name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS
    return block, own


def lora_saved_bytes_per_token(linears: list[Linear], s: PlanSettings) -> int:
    """What the adapters of these linear layers save per token (counted per module on tiny models,
    tests/test_plan.py). The 4-bit base layer saves nothing of its input. Without dropout an adapter saves its
    input, shared by the adapters reading the same tensor (q/k/v; gate/up) when it is already in the adapter's
    dtype; with dropout each adapter saves its mask (in the adapter's dtype) and its dropped-out input."""
    if not linears:
        return 0
    rb, ab = s.compute_bytes, lora_param_bytes(s)
    rank = rb * s.lora_r * len(linears)  # each lora_B's input
    if s.lora_dropout > 0:
        return rank + (ab + rb) * sum(lin.in_features for lin in linears)
    if ab != rb:  # fp16 autocast with fp32 adapters: each adapter's own 16-bit copy of its input
        return rank + rb * sum(lin.in_features for lin in linears)
    shared = {_input_of(lin): lin.in_features for lin in linears}
    return rank + rb * sum(shared.values())


def layer_saved_bytes_per_token(shape: ModelShape, s: PlanSettings, part: str = "layer") -> int:
    """Bytes autograd saves for backward in one decoder layer, per token (counted on tiny models).

    ``part``: "layer" (all of it), "mlp" (the MLP's share: its intermediates and its adapters' inputs) or
    "tiled" (the layer with a tiled MLP, which keeps only the MLP's input: models/tiled_mlp.py)."""
    layer0 = [lin for lin in shape.linears if ".0." in lin.name]  # one decoder layer's linear layers
    per_layer = adapted_linears(layer0, s.target_modules)
    mlp_layers = [lin for lin in per_layer if ".mlp." in lin.name]
    h, i, d, rb = shape.hidden_size, shape.intermediate_size, shape.head_dim, s.compute_bytes
    mlp = 3 * rb * i + lora_saved_bytes_per_token(mlp_layers, s)  # gate, up, the activation; adapters' inputs
    if part == "mlp":
        return mlp
    saved = 8 * h + 8  # fp32 copies of the two norms' inputs, and their 1/rms
    saved += rb * (2 * shape.num_heads + 2 * shape.num_kv_heads) * d + 4 * shape.num_heads  # q, out, k, v; lse
    saved += lora_saved_bytes_per_token([lin for lin in per_layer if lin not in mlp_layers], s)
    return saved + (rb * h if part == "tiled" else mlp)


def layer_transient_bytes(shape: ModelShape, s: PlanSettings) -> int:
    """What one decoder layer adds while it runs backward (measured per module on tiny Llama models in fp32 and
    bf16, with and without dropout, and on SmolLM2-135M at 4k and 8k tokens: tests/test_plan.py, docs/long-context.md).

    With checkpointing, its saved tensors recomputed; then the MLP's gradients, 1.5 intermediates' worth while its
    backward runs. With a tiled MLP (models/tiled_mlp.py): the layer's saved tensors without the MLP's, one tile's
    MLP and its gradients, and the gradient of the MLP's input for the whole sequence."""
    tokens = s.micro_batch_size * s.max_length * s.sequences_per_row
    rb, h, i = s.compute_bytes, shape.hidden_size, shape.intermediate_size

    def mlp_gradients(n: int) -> int:
        return 3 * rb * i * n // 2

    if not s.tiled_mlp:
        recomputed = layer_saved_bytes_per_token(shape, s) * tokens if s.gradient_checkpointing else 0
        return recomputed + mlp_gradients(tokens)
    tile = s.micro_batch_size * min(s.max_length, s.mlp_tile_tokens) * s.sequences_per_row
    recomputed = layer_saved_bytes_per_token(shape, s, "tiled") * tokens if s.gradient_checkpointing else 0
    one_tile = layer_saved_bytes_per_token(shape, s, "mlp") * tile + mlp_gradients(tile)
    return recomputed + one_tile + rb * h * tokens


def offloaded_host_bytes(shape: ModelShape, s: PlanSettings) -> int:
    """Pinned host memory activation offloading takes: what the GPU would otherwise keep (checkpointed layer
    inputs, or every layer's saved tensors without checkpointing), all layers' worth, at the step's peak."""
    if not s.activation_offloading:
        return 0
    tokens = s.micro_batch_size * s.max_length * s.sequences_per_row
    if s.gradient_checkpointing:
        return s.compute_bytes * shape.hidden_size * tokens * shape.num_layers
    return layer_saved_bytes_per_token(shape, s, "tiled" if s.tiled_mlp else "layer") * tokens * shape.num_layers
