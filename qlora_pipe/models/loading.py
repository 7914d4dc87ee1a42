"""Tokenizer, 4-bit base model and LoRA adapter.

The training side's bitsandbytes settings live here: the quantization config and the frozen 4-bit
layers (the guard against bitsandbytes' CPU fast path is in compat/bitsandbytes.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qlora_pipe.compat.bitsandbytes import keep_plain_nf4_on_cpu
from qlora_pipe.compat.transformers import tensors_loaded_as
from qlora_pipe.data.chat_templates import select_chat_template
from qlora_pipe.data.tokens import PAD_CANDIDATES, ensure_distinct_pad  # noqa: F401  (re-exported)
from qlora_pipe.errors import UserError
from qlora_pipe.machine.dist import local_rank, sharded_launch
from qlora_pipe.machine.hardware import with_resolved_precision
from qlora_pipe.machine.shard_rules import refuse_sharded
from qlora_pipe.models.embedding_storage import keep_input_embedding_stored, stored_embedding_dtypes
from qlora_pipe.recipe import Recipe
from qlora_pipe.recipe.lora_targets import unmatched_targets
from qlora_pipe.recipe.model_source import check_model_files, local_path

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


@dataclass
class TrainableModel:
    model: nn.Module  # a peft.PeftModel
    trainable_params: int
    total_params: int


def training_device() -> torch.device:
    """This process's device: its own GPU under a multi-process launch, else cuda or cpu."""
    return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def model_location(name: str) -> str:
    """What from_pretrained gets: the expanded local path, the plain folder converted from a GGUF file (once,
    cached), or the Hub id as written."""
    from qlora_pipe.models.gguf_source import base_folder, gguf_file_of

    gguf = gguf_file_of(name)
    if gguf is not None:
        return str(base_folder(gguf))
    path = local_path(name)
    return str(path) if path is not None else name


def check_model_source(recipe: Recipe) -> None:
    """Fail before any download or load: a missing or broken local model, or one whose code would run."""
    check_model_files(model_location(recipe.model.name_or_path), recipe.model.trust_remote_code)


def load_tokenizer(recipe: Recipe):
    """The base model's tokenizer with a chat template and a pad token distinct from EOS."""
    from transformers import AutoTokenizer

    check_model_source(recipe)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_location(recipe.model.name_or_path),
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    except OSError as exc:
        raise UserError(f"model.name_or_path: cannot load tokenizer of {recipe.model.name_or_path!r}: {exc}") from exc
    described = select_chat_template(tokenizer, recipe.data.chat_template)
    log.info("chat template: %s", described)
    ensure_distinct_pad(tokenizer)
    return tokenizer


def load_run_tokenizer(run_root: str | Path):
    """The tokenizer a run saved: its pad token and the exact chat template training used. Chat, eval,
    export and fidelity all read it this one way."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(run_root))


def quantization_config(recipe: Recipe):
    """The BitsAndBytesConfig for the recipe, or None for plain 16-bit LoRA."""
    from transformers import BitsAndBytesConfig

    q = with_resolved_precision(recipe).quantization
    if not q.enabled:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage=DTYPES[q.quant_storage],
    )


def load_base_model(recipe: Recipe, device: torch.device | None = None) -> nn.Module:
    """The frozen base model: 4-bit per the recipe, or 16-bit when quantization is disabled."""
    from transformers import AutoModelForCausalLM

    check_model_source(recipe)
    check_sharded_quantization(recipe)
    device = device or training_device()
    name = recipe.model.name_or_path
    dtype = DTYPES[with_resolved_precision(recipe).quantization.compute_dtype]
    stored = dtype == torch.float32 and not sharded_launch()  # the input embedding kept in its stored 16 bits
    planned = stored_embedding_dtypes(model_location(name), recipe.lora.modules_to_save) if stored else {}
    try:
        with tensors_loaded_as(planned):
            model = AutoModelForCausalLM.from_pretrained(
                model_location(name),
                revision=recipe.model.revision,
                trust_remote_code=recipe.model.trust_remote_code,
                quantization_config=quantization_config(recipe),
                dtype=dtype,
                # Sharded launches (FSDP, ZeRO-3) place the weights themselves; otherwise one device per process.
                device_map=None if sharded_launch() else {"": device},
                attn_implementation=recipe.model.attn_implementation,
                use_safetensors=True,  # pickle weights can run code when loaded: never loaded
            )
    except (OSError, ValueError) as exc:  # a Hub repo without safetensors, remote code refused, a broken file
        raise UserError(f"model.name_or_path: cannot load {name!r}: {exc}") from exc
    keep_plain_nf4_on_cpu(model)  # compat/bitsandbytes.py: the CPU fast path rewrites NF4 weights
    if stored:
        kept = keep_input_embedding_stored(model, recipe.lora.modules_to_save)
        if kept is not None:
            log.info("input embedding kept in its stored %s (exact; its output cast to float32)", str(kept)[6:])
    return model


def check_sharded_quantization(recipe: Recipe) -> None:
    """Under FSDP or ZeRO-3, what such a launch cannot run is refused in one line before anything loads
    (shard_rules.py: 4-bit weights stored in another dtype than the rest, GRPO, micro_batch_size auto,
    pushing FSDP's sharded checkpoints)."""
    launch = sharded_launch()
    if launch:
        refuse_sharded(recipe, launch)


def linear_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the layers LoRA can adapt (linear, 4-bit linear, GPT-2 Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear | Conv1D)]


def check_target_modules(model: nn.Module, targets: list[str] | str) -> None:
    """Every requested target must match at least one adaptable layer, before training starts."""
    if targets == "all-linear":
        return
    names = linear_module_names(model)
    missing = unmatched_targets(names, targets)
    if missing:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise UserError(
            f"lora.target_modules: {', '.join(missing)} match no linear layer of the model "
            f"(available: {', '.join(suffixes)})"
        )


def prepare_frozen_base(model: nn.Module, checkpointing: bool) -> nn.Module:
    """Freeze the base and switch on (non-reentrant) gradient checkpointing.

    The unquantized parts (embeddings, lm_head, norms) stay in the compute dtype, as TRL's own
    QLoRA path leaves them. PEFT's ``prepare_model_for_kbit_training`` would cast them to fp32:
    4 GiB more for a 152k-vocabulary 7B model, an fp32 residual stream (twice the activation
    memory) and slower steps, for no gain the loss curves show. Training and every reload go
    through this one function, so a reloaded adapter sees exactly the base it was trained on.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return model


def add_lora(
    model: nn.Module,
    recipe: Recipe,
    task_type: str = "CAUSAL_LM",
    targets: str | None = None,
    modules_to_save: list[str] | None = None,
) -> TrainableModel:
    """Prepare the frozen base for training and wrap it with a fresh LoRA adapter. ``targets`` and
    ``modules_to_save``: the caller's own choice (a vision model's: qlora_pipe/vision/model.py), already checked."""
    from peft import LoraConfig, get_peft_model

    if targets is None:
        check_target_modules(model, recipe.lora.target_modules)
    model = prepare_frozen_base(model, recipe.training.gradient_checkpointing)
    lora = recipe.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets if targets is not None else lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=(modules_to_save if targets is not None else lora.modules_to_save) or None,
        bias="none",
        task_type=task_type,
    )
    peft_model = get_peft_model(model, config)
    if recipe.training.tiled_mlp is True:  # 'auto' is settled before training (plan/long_context.py)
        from qlora_pipe.models.tiled_mlp import tile_mlps

        log.info("tiled MLP: %d decoder layers' MLPs run over sequence tiles", tile_mlps(peft_model))
    trainable, total = peft_model.get_nb_trainable_parameters()
    if trainable == 0:
        raise UserError("lora: the adapter has no trainable parameters; check lora.target_modules")
    return TrainableModel(peft_model, trainable, total)


def load_trainable_model(recipe: Recipe, tokenizer=None) -> tuple[object, TrainableModel]:
    """Tokenizer (unless given), then the 4-bit base with a LoRA adapter: the model stage in one call."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe)
    base = load_base_model(recipe)
    if base.config.pad_token_id is None or base.config.pad_token_id == tokenizer.eos_token_id:
        base.config.pad_token_id = tokenizer.pad_token_id
    trainable = add_lora(base, recipe)
    pct = 100 * trainable.trainable_params / max(trainable.total_params, 1)
    log.info(
        "trainable params: %s of %s (%.4f%%)",
        f"{trainable.trainable_params:,}",
        f"{trainable.total_params:,}",
        pct,
    )
    return tokenizer, trainable


def load_trained_model(recipe: Recipe, adapter_dir: str | Path) -> nn.Module:
    """The 4-bit base plus a saved adapter, as it was at the end of training (eval mode)."""
    from peft import PeftModel

    check_adapter_files(Path(adapter_dir))
    base = prepare_frozen_base(load_base_model(recipe), checkpointing=False)
    try:
        # Keep the adapter in the dtype it was trained and saved in (TRL trains QLoRA adapters in bf16).
        model = PeftModel.from_pretrained(base, str(adapter_dir), autocast_adapter_dtype=False)
    except (RuntimeError, ValueError, KeyError) as exc:  # size mismatches, unknown modules
        reason = " ".join(str(exc).split())[:300]
        raise UserError(
            f"the adapter in {adapter_dir} does not fit its base model {recipe.model.name_or_path}: {reason}"
        ) from exc
    return model.eval()


def check_adapter_files(adapter_dir: Path) -> None:
    """A run's adapter must be there and whole before its base is loaded."""
    from qlora_pipe.recipe.model_source import safetensors_problem

    weights, config = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_config.json"
    for path in (config, weights):
        if not path.is_file():
            raise UserError(f"{adapter_dir}: no adapter ({path.name} is missing); finish, resume or retrain the run")
    problem = safetensors_problem(weights)
    if problem:
        raise UserError(f"{weights}: the adapter {problem}")
