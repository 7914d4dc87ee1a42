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
from qlora_pipe.plan.layer_bytes import (
    adapted_linears,
    layer_saved_bytes_per_token,
    layer_transient_bytes,
    lora_param_bytes,
)
from qlora_pipe.plan.settings import PlanSettings
from qlora_pipe.plan.shapes import Linear, ModelShape

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


def adapter_params(adapted: list[Linear], s: PlanSettings) -> int:
    """The adapter parameters on these adapted layers: A and B of rank r, and DoRA's magnitude vector."""
    return sum(s.lora_r * (lin.in_features + lin.out_features) + lin.out_features * s.use_dora for lin in adapted)


def layer_lora_params(shape: ModelShape, s: PlanSettings) -> int:
    """The adapter parameters of one decoder layer."""
    return adapter_params(adapted_linears([lin for lin in shape.linears if ".0." in lin.name], s.target_modules), s)


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
