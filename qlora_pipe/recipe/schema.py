"""The recipe: a typed, validated description of one fine-tuning run.

No torch imports here: validating a recipe must be instant and must not need a GPU.
Every field carries a one-line description; ``qlora-pipe validate --explain`` prints them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from qlora_pipe.recipe.base import Section, _a_size
from qlora_pipe.recipe.grpo import GrpoSection, grpo_refusal
from qlora_pipe.recipe.methods import (
    METHODS,
    TASKS,
    ClassificationSection,
    PreferenceSection,
    RewardSection,
    VisionSection,
    kind_of,
)
from qlora_pipe.recipe.output_sections import ExportSection, GenerationSection, HubSection
from qlora_pipe.recipe.source_section import SourceSection
from qlora_pipe.recipe.trainer_limits import trainer_refusal

ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]


class ModelSection(Section):
    name_or_path: str = Field(description="Hub id or local directory of the base model (a causal LM).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub repository to run.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    adapter: str | None = Field(
        None, description="A finished run whose adapter training continues (e.g. the SFT run a DPO run starts from)."
    )


class QuantizationSection(Section):
    enabled: bool = Field(True, description="Load the base in 4-bit (QLoRA); false gives plain 16-bit LoRA.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.37 bit/param).")
    compute_dtype: ComputeDtype = Field(
        "auto",
        description="Dtype the 4-bit weights are dequantized to for matmuls; 'auto' follows training.precision.",
    )
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="Storage dtype of packed 4-bit weights (bfloat16 for FSDP sharding)."
    )


class LoraSection(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r)).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer but lm_head."
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale = alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): also learns a magnitude vector.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter (e.g. lm_head)."
    )

    @field_validator("target_modules")
    @classmethod
    def _names_or_all_linear(cls, value: list[str] | str) -> list[str] | str:
        if (isinstance(value, list) and not value) or (isinstance(value, str) and value != "all-linear"):
            raise ValueError("must be a non-empty list of module names, or 'all-linear'")
        return value


class DataSection(Section):
    train_path: str | None = Field(None, description="Shorthand for one training source: a local file.")
    eval_path: str | None = Field(None, description="Shorthand for one held-out source: a local file.")
    sources: list[SourceSection] = Field(default_factory=list, description="Training sources, mixed.")
    eval_sources: list[SourceSection] = Field(default_factory=list, description="Held-out sources.")
    eval_fraction: float = Field(0.0, ge=0, lt=0.5, description="Hold out this share of training rows (seeded).")
    chat_template: str | None = Field(
        None, description="None: the tokenizer's own; or chatml, llama-3, mistral, gemma, plain, or a .jinja file."
    )
    max_length: int | Literal["auto"] = Field(
        2048, description="Longest tokenized example, in tokens; 'auto' plans it from the GPU memory (see plan)."
    )
    overlength: Literal["drop", "truncate", "error"] = Field(
        "drop", description="What to do with rows longer than max_length (always counted)."
    )
    on_bad_row: Literal["drop", "error"] = Field("drop", description="Drop (and count) or reject invalid rows.")
    loss_on: Literal["assistant", "completion", "all"] = Field(
        "assistant", description="Train on assistant turns, on the final answer only, or on every token."
    )
    reasoning: Literal["train", "mask", "drop"] = Field(
        "train",
        description="Reasoning traces (reasoning_content / <think>): train them, keep them as masked context, or drop.",
    )
    dedupe: bool = Field(False, description="Drop rows that repeat an earlier row (always counted in the report).")
    packing: bool = Field(False, description="Pack rows into max_length sequences (TRL best-fit-decreasing).")
    num_proc: int | None = Field(None, ge=1, description="Processes for tokenization (datasets.map).")
    cache_dir: str = Field(
        "~/.cache/qlora-pipe/data", description="Where tokenized datasets are cached, keyed by fingerprint."
    )
    max_train_samples: int | None = Field(None, ge=1, description="Use only the first N training rows.")
    max_eval_samples: int | None = Field(None, ge=1, description="Use only the first N eval rows.")

    @model_validator(mode="after")
    def _consistent(self) -> DataSection:
        if (self.train_path is None) == (not self.sources):
            raise ValueError("give either 'train_path' or 'sources' (one or more)")
        held_out = [self.eval_path is not None, bool(self.eval_sources), self.eval_fraction > 0]
        if sum(held_out) > 1:
            raise ValueError("give at most one of 'eval_path', 'eval_sources', 'eval_fraction'")
        return self

    @field_validator("max_length")
    @classmethod
    def _long_enough(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 16:
            raise ValueError("must be at least 16 tokens, or 'auto'")
        return value

    def train_sources(self) -> list[SourceSection]:
        return self.sources or [SourceSection(path=self.train_path)]

    def held_out_sources(self) -> list[SourceSection]:
        return self.eval_sources or ([SourceSection(path=self.eval_path)] if self.eval_path else [])

    def has_eval(self) -> bool:
        return bool(self.held_out_sources()) or self.eval_fraction > 0


class TrainingSection(Section):
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps to run; -1 means run num_epochs.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the training data (when max_steps is -1).")
    micro_batch_size: int | Literal["auto"] = Field(
        1, description="Sequences per forward pass (per device); 'auto' finds the largest that fits."
    )
    auto_micro_batch_start: int = Field(16, ge=1, description="First size 'auto' tries, halving on OOM.")
    effective_batch_size: int | None = Field(
        None, ge=1, description="With micro_batch_size auto: sequences per optimizer step (default: accumulation)."
    )
    gradient_accumulation_steps: int = Field(16, ge=1, description="Micro batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate of the LoRA weights.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up the LR.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay on the LoRA weights.")
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm.")
    optimizer: Literal[
        "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch", "adamw_torch_fused", "sgd"
    ] = Field(
        "paged_adamw_8bit",
        description="Optimizer; paged ones fall back to non-paged without a GPU, bitsandbytes' (8-bit, paged) "
        "to adamw_torch_fused under FSDP.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Mixed-precision mode; 'auto': bf16 where native (GPU 8.0+, CPU AVX512-BF16/AMX), "
        "fp16 on older GPUs, fp32 on other CPUs.",
    )
    cpu_threads: int | Literal["auto"] = Field(
        "auto",
        description="Torch threads of a CPU run; 'auto': the CPUs free to the process "
        "(affinity, cgroup quota). QLORA_PIPE_CPU_THREADS overrides.",
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward (non-reentrant).")
    padding_free: bool = Field(
        False, description="Concatenate each micro batch without padding (needs flash_attention_2, or packing)."
    )
    liger_kernels: bool = Field(False, description="Liger Triton kernels: fused RMSNorm, RoPE, SwiGLU (needs a GPU).")
    activation_offloading: bool | Literal["auto"] = Field(
        "auto",
        description="Keep checkpointed activations in pinned CPU memory during forward (TRL; needs a GPU). "
        "'auto': on a GPU when the planner finds it lowers the peak by 10% or more, or is needed to fit "
        "(docs/long-context.md).",
    )
    tiled_mlp: bool | Literal["auto"] = Field(
        "auto",
        description="Run each layer's MLP over 2,048-token tiles so its intermediate never exists for the whole "
        "sequence (one more MLP forward per step). 'auto': on when the planner finds it lowers the peak by 10% "
        "or more, or is needed to fit (docs/long-context.md).",
    )
    torch_compile: bool = Field(False, description="Compile the model with torch.compile (slow start, faster steps).")
    memory_budget: str | None = Field(
        None,
        description="GPU memory that 'auto' sizes plan for, e.g. 24GiB (default: the GPU's own).",
    )
    logging_steps: int = Field(10, ge=1, description="Log train loss every N optimizer steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (None: only at start/end).")
    save_steps: int = Field(200, ge=1, description="Write a checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints.")
    max_bad_steps: int = Field(
        5, ge=1, description="Stop after this many consecutive steps with a non-finite loss or gradient."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers besides metrics.jsonl (tensorboard logs go to the run's tensorboard/).",
    )
    preview_prompts: list[str] = Field(
        default_factory=list, description="Questions answered (greedy) before and after training, side by side."
    )
    preview_max_new_tokens: int = Field(64, ge=1, description="Tokens generated per preview answer.")

    @field_validator("memory_budget")
    @classmethod
    def _budget_is_a_size(cls, value: str | None) -> str | None:
        return _a_size(value)

    @field_validator("micro_batch_size", "cpu_threads")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1, or 'auto'")
        return value


class Recipe(Section):
    run_name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name of the run directory.")
    output_dir: str = Field("runs", description="Parent directory of run directories.")
    seed: int = Field(42, ge=0, description="Seed for data order, LoRA init and dropout.")
    method: METHODS = Field(
        "sft",
        description="sft (supervised); dpo, orpo, kto on preferences (docs/preference.md); grpo (docs/grpo.md); "
        "reward: a reward model on preference pairs (docs/reward.md).",
    )
    model: ModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    grpo: GrpoSection = Field(default_factory=GrpoSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    task: TASKS = Field(
        "causal_lm", description="causal_lm (text), classification (docs/classification.md), vision (docs/vision.md)."
    )
    classification: ClassificationSection = Field(default_factory=ClassificationSection)
    vision: VisionSection = Field(default_factory=VisionSection)
    export: ExportSection = Field(default_factory=ExportSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    hub: HubSection = Field(default_factory=HubSection)

    # Where the recipe was read from, for error messages. Relative paths inside a recipe are
    # relative to the working directory (the repository root in every documented command).
    source: str | None = Field(None, exclude=True, description="Path the recipe was loaded from (internal).")
    # The --set overrides it was loaded with, so a printed resume command reproduces the same recipe.
    overrides: list[str] = Field(default_factory=list, exclude=True, description="--set overrides (internal).")

    @model_validator(mode="after")
    def _task_fits(self) -> Recipe:
        kind = kind_of(self)
        if refusal := kind.method_refusal(self.task, self.method):
            raise ValueError(refusal)
        if not kind.generates and self.training.preview_prompts:
            raise ValueError(f"training.preview_prompts: a {kind.noun} does not generate; leave it out")
        if not kind.continues_adapter and self.model.adapter:
            raise ValueError(f"model.adapter: a {kind.noun} starts from a fresh adapter and head; leave it out")
        if refusal := trainer_refusal(self):
            raise ValueError(refusal)
        if not kind.planned and "auto" in (self.data.max_length, self.training.micro_batch_size):
            raise ValueError(f"a {kind.noun} is not planned yet: give data.max_length and micro_batch_size as numbers")
        t = self.training
        effective = (t.effective_batch_size or t.gradient_accumulation_steps) if t.micro_batch_size == "auto" else None
        accumulation = t.gradient_accumulation_steps
        if refusal := grpo_refusal(self.method, self.grpo, t.micro_batch_size, accumulation, effective):
            raise ValueError(refusal)
        return self

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def dump_yaml(self) -> str:
        """The resolved recipe (defaults filled in) as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
