"""The recipe values a plan depends on (``PlanSettings``), read from a recipe once or set for a what-if question."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from qlora_pipe.machine.hardware import planning_hardware, with_resolved_precision
from qlora_pipe.models.tiled_mlp import TILE_TOKENS
from qlora_pipe.recipe import Recipe


@dataclass
class PlanSettings:
    """The recipe values the memory depends on (overridable for what-if questions)."""

    micro_batch_size: int
    max_length: int
    quantized: bool = True
    double_quant: bool = True
    compute_bytes: int = 2
    lora_r: int = 16
    target_modules: list[str] | str = "all-linear"
    lora_dropout: float = 0.05
    use_dora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    optimizer: str = "paged_adamw_8bit"
    precision: str = "bf16"
    gradient_checkpointing: bool = True
    activation_offloading: bool = False
    tiled_mlp: bool = False  # each layer's MLP over sequence tiles (models/tiled_mlp.py)
    mlp_tile_tokens: int = TILE_TOKENS
    # Preference tuning (method: dpo): chosen and rejected go through the model as one batch of twice the
    # rows, and TRL keeps a frozen copy of the starting adapter as the reference (no second base model).
    sequences_per_row: int = 1
    reference_adapter: bool = False
    generation_steps: int = 0  # GRPO: micro batches per generation batch (0: none); plan/grpo_terms.py
    gpus: int = 1  # FSDP-QLoRA (`plan --gpus N`): each GPU's share of a FULL_SHARD run (plan/fsdp.py)
    cpu_offload: bool = False

    @classmethod
    def from_recipe(cls, recipe: Recipe, micro_batch_size: int, max_length: int) -> PlanSettings:
        # A recipe with precision auto is planned for the GPU it will run on (see planning_hardware).
        recipe = with_resolved_precision(recipe, planning_hardware())
        q, lora, t = recipe.quantization, recipe.lora, recipe.training
        settings = cls(
            micro_batch_size=micro_batch_size,
            max_length=max_length,
            quantized=q.enabled,
            double_quant=q.double_quant,
            compute_bytes=4 if q.compute_dtype == "float32" else 2,
            lora_r=lora.r,
            target_modules=lora.target_modules,
            lora_dropout=lora.dropout,
            use_dora=lora.use_dora,
            modules_to_save=list(lora.modules_to_save),
            optimizer=t.optimizer,
            precision=t.precision,
            gradient_checkpointing=t.gradient_checkpointing,
            # 'auto' switches are planned on here; plan/long_context.py settles them at the run's length
            activation_offloading=t.activation_offloading is not False,
            tiled_mlp=t.tiled_mlp is not False,
        )
        from qlora_pipe.methods import method_for

        return replace(settings, **method_for(recipe).plan_settings(recipe))
