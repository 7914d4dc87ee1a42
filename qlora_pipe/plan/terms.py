"""Peak GPU memory of a training run, predicted from the model's config.json alone.

Each term is a formula over the shapes in ``plan.shapes.ModelShape`` and the recipe; the
sources are written beside each one. What is measured and how:

- 4-bit weights: bytes per tensor from bitsandbytes' block sizes (blocksize 64; with double
  quantization the fp32 absmax becomes uint8 plus one fp32 per 256 blocks and a 256-entry code
  book). Checked to the byte against loaded tiny models (tests/test_plan.py).
- The parts bitsandbytes leaves unquantized (embeddings, lm_head, norms, biases) stay in the compute
  dtype, but for an fp32 load's untied input embedding (stored 16-bit: models/embedding_storage.py).
- Activations: the tensors autograd saves for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` on tiny Llama models under bf16 autocast. The
  residual stream is in the compute dtype; RMSNorm saves an fp32 copy of its input.
- The loss: TRL's SFTTrainer computes it with a chunked fused LM head, so its buffers are tiles,
  not vocabulary x tokens logits (``loss_bytes``).
- Backward working set, loss buffers and runtime overhead are estimates; scripts/gpu_check.sh
  compares the whole prediction with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qlora_pipe.plan.fsdp import fsdp_rows, planned_optimizer
from qlora_pipe.plan.grpo_terms import generation_terms
from qlora_pipe.plan.settings import PlanSettings
from qlora_pipe.plan.shapes import Linear, ModelShape
from qlora_pipe.recipe.lora_targets import is_target

GiB = 2**30
BLOCKSIZE = 64  # bitsandbytes 4-bit block size
NESTED_BLOCKSIZE = 256  # double quantization: absmax values per nested block
CUDA_CONTEXT = 512 * 2**20  # assumption: CUDA context and kernels outside the allocator
FRAGMENTATION = 0.05  # assumption: caching-allocator slack on top of the allocated peak
RUNTIME_TERM = "runtime overhead"
TOKEN_TILE, VOCAB_TILE = 4096, 32768  # TRL's chunked log-prob tile
# Terms that torch.cuda.max_memory_allocated does not see.
UNALLOCATED = (RUNTIME_TERM, "optimizer states (paged)")


def nf4_tensor_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one 4-bit weight with its quantization state, as bitsandbytes stores it."""
    blocks = math.ceil(numel / BLOCKSIZE)
    packed = math.ceil(numel / 2)
    code = 16 * 4  # the NF4 code book, fp32
    if not double_quant:
        return packed + blocks * 4 + code
    nested = math.ceil(blocks / NESTED_BLOCKSIZE) * 4 + 256 * 4 + 4  # fp32 absmax, code book, offset
    return packed + blocks + nested + code


@dataclass
class MemoryPlan:
    terms: list[tuple[str, int]]  # (name, bytes), in the order they are printed
    notes: dict[str, str]
    settings: PlanSettings
    shape: ModelShape
    trainable_params: int
    budget: int | None = None

    @property
    def total(self) -> int:
        return sum(b for _, b in self.terms)

    @property
    def allocated(self) -> int:
        """The part torch.cuda.max_memory_allocated reports (no context, slack or paged states)."""
        return sum(b for name, b in self.terms if name not in UNALLOCATED)

    def term(self, name: str) -> int:
        return dict(self.terms)[name]

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    @property
    def headroom(self) -> int | None:
        return None if self.budget is None else self.budget - self.total


def adapted_linears(linears: list[Linear], targets: list[str] | str) -> list[Linear]:
    """The linear layers LoRA wraps: all of them for 'all-linear', else those whose name ends a target."""
    if targets == "all-linear":
        return list(linears)
    return [lin for lin in linears if is_target(lin.name, targets)]


def _saved_module_params(shape: ModelShape, names: list[str]) -> int:
    """Parameters of modules_to_save: fully trained copies (embeddings, lm_head or linear layers)."""
    embed = shape.vocab_size * shape.hidden_size
    total = 0
    for name in names:
        if name in ("lm_head", "embed_tokens"):
            total += embed
        else:
            total += sum(lin.in_features * lin.out_features for lin in adapted_linears(shape.linears, [name]))
    return total


def optimizer_bytes_per_param(optimizer: str, param_bytes: int) -> float:
    """State bytes per trainable parameter (exp_avg + exp_avg_sq for the Adam family)."""
    if optimizer == "sgd":
        return 0.0  # transformers' SGD has no momentum by default
    if optimizer.endswith("8bit"):
        # bitsandbytes blockwise 8-bit states: 2 bytes plus one fp32 absmax per 256 values per state.
        return 2 + 2 * 4 / 256
    if optimizer in ("paged_adamw_32bit",):
        return 8.0  # bitsandbytes keeps 32-bit states in fp32 whatever the parameter dtype
    return 2.0 * param_bytes  # torch AdamW: states in the parameter's dtype


def weight_terms(shape: ModelShape, s: PlanSettings) -> list[tuple[str, int, str]]:
    saved = shape.embedding_bytes_saved(s.compute_bytes, s.modules_to_save)
    other_bytes = shape.other_params * s.compute_bytes - saved
    stored = ", the input embedding in its stored 16-bit" if saved else ""
    if s.quantized:
        quantized = sum(nf4_tensor_bytes(lin.in_features * lin.out_features, s.double_quant) for lin in shape.linears)
        kind = "NF4 + double quant" if s.double_quant else "NF4"
        per_param = 8 * quantized / max(shape.quantized_params, 1)
        first = ("base weights, 4-bit", quantized, f"{shape.quantized_params:,} params, {kind}: {per_param:.3f} bit")
        other = (
            "base weights, not quantized",
            other_bytes,
            f"embeddings, lm_head, norms, biases in {8 * s.compute_bytes}-bit{stored}",
        )
    else:
        first = ("base weights, 16-bit", shape.quantized_params * s.compute_bytes, "linear layers (no quantization)")
        other = ("base weights, other", other_bytes, f"embeddings, lm_head, norms, biases{stored}")
    return [first, other]


def trainable_terms(shape: ModelShape, s: PlanSettings) -> tuple[int, list[tuple[str, int, str]]]:
    adapted = adapted_linears(shape.linears, s.target_modules)
    lora_params = adapter_params(adapted, s)
    lora_bytes = lora_param_bytes(s)
    full = _saved_module_params(shape, s.modules_to_save)  # trained copies, in the compute dtype
    weights = lora_params * lora_bytes + full * s.compute_bytes
    optimizer = planned_optimizer(s)
    states = optimizer_bytes_per_param(optimizer.name, lora_bytes) * lora_params
    states += optimizer_bytes_per_param(optimizer.name, s.compute_bytes) * full
    state_name = "optimizer states (paged)" if optimizer.name.startswith("paged_") else "optimizer states"
    used = f"{optimizer.name} (training.optimizer {s.optimizer}: not under FSDP)" if optimizer.notice else s.optimizer
    rows = [
        ("LoRA weights", weights, f"{lora_params:,} params, r={s.lora_r}, {len(adapted)} layers"),
        ("LoRA gradients", weights, "same size and dtype as the trained weights"),
        (state_name, int(states), used),
    ]
    if s.reference_adapter:
        label = "reference adapter (GRPO)" if s.generation_steps else "reference adapter (DPO)"
        rows.append((label, lora_params * lora_bytes, "TRL's frozen copy of the starting adapter"))
    return lora_params + full, rows


def lora_param_bytes(s: PlanSettings) -> int:
    """TRL casts the adapter of a 4-bit model to bf16 when training in bf16; otherwise PEFT keeps it in fp32."""
    return 2 if s.quantized and s.precision == "bf16" else 4


def adapter_params(adapted: list[Linear], s: PlanSettings) -> int:
    """The adapter parameters on these adapted layers: A and B of rank r, and DoRA's magnitude vector."""
    return sum(s.lora_r * (lin.in_features + lin.out_features) + lin.out_features * s.use_dora for lin in adapted)


def layer_lora_params(shape: ModelShape, s: PlanSettings) -> int:
    """The adapter parameters of one decoder layer."""
    return adapter_params(adapted_linears([lin for lin in shape.linears if ".0." in lin.name], s.target_modules), s)


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


def activation_terms(shape: ModelShape, s: PlanSettings) -> list[tuple[str, int, str]]:
    tokens = s.micro_batch_size * s.max_length * s.sequences_per_row
    layer = layer_saved_bytes_per_token(shape, s, "tiled" if s.tiled_mlp else "layer") * tokens
    residual = s.compute_bytes * shape.hidden_size * tokens  # one hidden state
    if s.gradient_checkpointing:
        kept = residual * shape.num_layers + 4 * shape.hidden_size * tokens  # + the final norm's fp32 input
        note = f"checkpointed inputs of {shape.num_layers} layers + the final norm's"
        if s.activation_offloading:
            kept, note = 2 * residual, "layer inputs offloaded to CPU; two in flight"
    else:
        kept, note = layer * shape.num_layers, f"every layer's saved tensors ({shape.num_layers} layers)"
        if s.activation_offloading:
            kept, note = 2 * layer, "saved tensors offloaded to CPU; two layers in flight"
    backward = layer_transient_bytes(shape, s)
    mlp = f", MLP in tiles of {s.mlp_tile_tokens:,} tokens" if s.tiled_mlp else ""
    logits = loss_bytes(shape, tokens, s.compute_bytes)
    peak_note = f"max of layer backward {_gib(backward)}{mlp} and chunked loss {_gib(logits)}"
    return [
        ("activations kept", kept, f"{tokens:,} tokens{pairs_note(s)}: {note}"),
        ("transient peak", max(backward, logits), peak_note),
    ]


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


def pairs_note(s: PlanSettings) -> str:
    return " (chosen + rejected per pair)" if s.sequences_per_row == 2 else ""


def loss_bytes(shape: ModelShape, tokens: int, compute_bytes: int = 2, token_tile: int = TOKEN_TILE) -> int:
    """TRL 1.16's fused LM head (always on in SFTTrainer): log-probs in [4096 tokens x 32768 vocab] tiles.

    Its forward saves a copy of the final hidden states (compute dtype) and its backward accumulates an
    fp32 gradient of them; the tile buffer (compute dtype, allocated at the full 32768 width whatever
    the vocabulary) is transient. Full-vocabulary logits never exist (trl/kernels/chunked_logprob.py).
    """
    tile = min(tokens, token_tile) * VOCAB_TILE * compute_bytes
    return (compute_bytes + 4) * shape.hidden_size * tokens + tile


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def plan_memory(shape: ModelShape, s: PlanSettings, budget: int | None = None) -> MemoryPlan:
    """Every peak-memory term for these settings, and the total against ``budget``."""
    rows = weight_terms(shape, s)
    trainable, rows_t = trainable_terms(shape, s)
    rows += rows_t
    if s.gpus > 1:  # FSDP: this GPU's share, plus the units it gathers (plan/fsdp.py)
        rows = fsdp_rows(shape, s, rows, layer_lora_params(shape, s), lora_param_bytes(s))
    rows += activation_terms(shape, s)
    rows += generation_terms(shape, s, rows)
    overhead = CUDA_CONTEXT + int(FRAGMENTATION * sum(b for _, b, _ in rows))
    nccl = "; NCCL's buffers not counted" if s.gpus > 1 else ""
    rows.append((RUNTIME_TERM, overhead, f"CUDA context (~0.5 GiB) + 5% allocator slack (assumed){nccl}"))
    terms = [(name, b) for name, b, _ in rows]
    notes = {name: note for name, _, note in rows}
    return MemoryPlan(terms, notes, s, shape, trainable, budget)
