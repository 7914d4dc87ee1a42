"""A vision-language model for QLoRA: its language model in 4-bit NF4, the vision tower and projector in 16 bits.

transformers' ``AutoModelForImageTextToText`` loads the families (Idefics3/SmolVLM, Qwen2-VL, Qwen2.5-VL,
Gemma 3, LLaVA, ...). Which modules are the language model is read from the model itself
(``get_decoder()``), built on the meta device from its config; every other part beside it (the vision tower,
the projector) is kept out of 4-bit.
LoRA goes on the language model's linear layers; ``vision.tower`` and ``vision.projector`` put LoRA on those
parts too (``lora``) or train them whole (``full``, saved beside the adapter by PEFT's modules_to_save).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from qlora_pipe.errors import UserError

log = logging.getLogger(__name__)

PROJECTOR = re.compile(r"(connector|projector|merger)$")


@dataclass(frozen=True)
class VisionParts:
    language: str  # the language model's qualified name ("model.text_model", "model.language_model")
    tower: tuple[str, ...]  # the vision encoder's modules (outside the language model)
    projector: tuple[str, ...]  # the modules mapping image features to the language model's inputs
    linear: dict[str, tuple[str, ...]]  # qualified names of the linear layers of each part, by part

    def kept_out_of_4bit(self) -> list[str]:
        return [*self.tower, *self.projector, "lm_head"]


def vision_parts(config) -> VisionParts:
    """The parts of an image-text-to-text model, read from a meta-device copy built from its config."""
    from torch import nn
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    names = {id(module): name for name, module in model.named_modules()}
    language = names[id(model.get_decoder())]
    parent = language.rpartition(".")[0]
    siblings = [f"{parent}.{n}" if parent else n for n, _ in model.get_submodule(parent).named_children()]
    outside = [s for s in siblings if s != language]
    projector = [s for s in outside if PROJECTOR.search(s)]
    projector += [
        n
        for n, _ in model.named_modules()
        if PROJECTOR.search(n)
        and not any(n.startswith(p) for p in projector)
        and any(n.startswith(o + ".") for o in outside)
    ]
    tower = [s for s in outside if s not in projector]
    linear = {"language": [], "tower": [], "projector": []}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.startswith(language + "."):
            linear["language"].append(name)
        elif any(name == p or name.startswith(p + ".") for p in projector):
            linear["projector"].append(name)
        elif any(name.startswith(t + ".") for t in tower):
            linear["tower"].append(name)
    return VisionParts(language, tuple(tower), tuple(projector), {k: tuple(v) for k, v in linear.items()})


def lora_targets(parts: VisionParts, recipe) -> tuple[str, list[str]]:
    """PEFT's target_modules (a regex over qualified names: the language model's linear layers, and the
    vision parts given ``lora``) and modules_to_save (the parts given ``full``)."""
    names = list(parts.linear["language"])
    wanted = recipe.lora.target_modules
    if wanted != "all-linear":
        names = [n for n in names if n.rsplit(".", 1)[-1] in wanted or n in wanted]
        found = {n.rsplit(".", 1)[-1] for n in names}
        missing = [t for t in wanted if t not in found and t not in names]
        if missing:
            available = sorted({n.rsplit(".", 1)[-1] for n in parts.linear["language"]})
            raise UserError(
                f"lora.target_modules: {', '.join(missing)} match no linear layer of the language model "
                f"(available: {', '.join(available)})"
            )
    for part in ("tower", "projector"):  # a vision part given LoRA: all of its linear layers
        if getattr(recipe.vision, part) == "lora":
            if not parts.linear[part]:
                raise UserError(f"vision.{part}: lora: this model's {part} has no linear layer; use frozen or full")
            names += parts.linear[part]
    if not names:
        raise UserError("lora.target_modules: no linear layer to adapt")
    pattern = "|".join(re.escape(n) for n in names)
    full = [
        *(parts.tower if recipe.vision.tower == "full" else ()),
        *(parts.projector if recipe.vision.projector == "full" else ()),
    ]
    return f"^(?:{pattern})$", full


def load_processor(recipe, tokenizer=None):
    """The model's processor (image processor, tokenizer, chat template); ``tokenizer``: the run's own (its pad
    token and template), which the processor then uses. vision.longest_edge bounds the image size."""
    from transformers import AutoProcessor

    from qlora_pipe.models.loading import model_location

    try:
        processor = AutoProcessor.from_pretrained(
            model_location(recipe.model.name_or_path),
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    except ImportError as exc:  # transformers 5 builds Qwen2-VL's video processor only with torchvision
        named = re.search(r"requires the (\w+) library", str(exc))
        library = named.group(1).lower() if named else " ".join(str(exc).split())[:120]
        raise UserError(
            f"model.name_or_path: the processor of {recipe.model.name_or_path!r} needs {library}, which is not "
            f"installed here (pip install {library}, the build matching your torch)"
        ) from exc
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model.name_or_path: cannot load the image processor of {recipe.model.name_or_path!r}: {exc}"
        ) from exc
    if not hasattr(processor, "image_processor"):
        raise UserError(
            f"model.name_or_path: {recipe.model.name_or_path!r} has no image processor (task: vision needs one)"
        )
    if tokenizer is not None:
        processor.tokenizer = tokenizer
    if recipe.vision.longest_edge is not None:
        bound_image_size(processor, recipe.vision.longest_edge)
    return processor


def bound_image_size(processor, longest: int) -> None:
    """Images resized so that their longest edge is at most ``longest`` pixels (fewer image tokens)."""
    image = processor.image_processor
    if hasattr(image, "max_image_size"):  # Idefics3 / SmolVLM: the resize and the global image
        image.size = {"longest_edge": longest}
        image.max_image_size = {"longest_edge": longest}
    elif hasattr(image, "max_pixels"):  # Qwen2-VL, Qwen2.5-VL: a pixel budget per image
        image.max_pixels = longest * longest
        if isinstance(getattr(image, "size", None), dict) and "longest_edge" in image.size:
            image.size = {**image.size, "longest_edge": longest * longest}
    else:
        raise UserError(
            f"vision.longest_edge: {type(image).__name__} resizes every image to one fixed size; leave it out"
        )


def load_vision_base(recipe, parts: VisionParts):
    """The frozen base: the language model in 4-bit per the recipe, the vision parts in the compute dtype."""
    from transformers import AutoModelForImageTextToText

    from qlora_pipe.compat.bitsandbytes import keep_plain_nf4_on_cpu
    from qlora_pipe.machine.hardware import with_resolved_precision
    from qlora_pipe.models.loading import (
        DTYPES,
        check_model_source,
        model_location,
        quantization_config,
        training_device,
    )

    check_model_source(recipe)
    name = recipe.model.name_or_path
    quantized = quantization_config(recipe)
    if quantized is not None:
        quantized.llm_int8_skip_modules = parts.kept_out_of_4bit()
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            model_location(name),
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
            quantization_config=quantized,
            dtype=DTYPES[with_resolved_precision(recipe).quantization.compute_dtype],
            device_map={"": training_device()},
            attn_implementation=recipe.model.attn_implementation,
            use_safetensors=True,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: cannot load {name!r} as an image-text-to-text model: {exc}") from exc
    keep_plain_nf4_on_cpu(model)
    return model


def model_config(recipe):
    from transformers import AutoConfig

    from qlora_pipe.models.loading import model_location

    try:
        return AutoConfig.from_pretrained(
            model_location(recipe.model.name_or_path),
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: cannot read the config of {recipe.model.name_or_path!r}: {exc}") from exc


def load_vision_policy(recipe, tokenizer):
    """The model to train: the base as above, a fresh LoRA adapter, the vision parts trained as asked."""
    from qlora_pipe.models.loading import add_lora

    config = model_config(recipe)
    try:
        parts = vision_parts(config)
    except (ValueError, KeyError) as exc:
        raise UserError(
            f"model.name_or_path: {recipe.model.name_or_path!r} is not an image-text-to-text model ({exc})"
        ) from exc
    rows = config.get_text_config().vocab_size
    if max(tokenizer.get_vocab().values()) >= rows:
        raise UserError(
            f"model.name_or_path: the tokenizer has ids up to {max(tokenizer.get_vocab().values())} but the language "
            f"model's embeddings have {rows} rows; resize them to the tokenizer before training"
        )
    base = load_vision_base(recipe, parts)
    if base.config.get_text_config().pad_token_id is None:
        base.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    targets, full = lora_targets(parts, recipe)
    trainable = add_lora(base, recipe, targets=targets, modules_to_save=full)
    log.info(
        "vision: language model %s in %s; tower %s (%s), projector %s (%s); trainable params %s of %s",
        parts.language,
        "4-bit" if recipe.quantization.enabled else "16-bit",
        ", ".join(parts.tower) or "none",
        recipe.vision.tower,
        ", ".join(parts.projector) or "none",
        recipe.vision.projector,
        f"{trainable.trainable_params:,}",
        f"{trainable.total_params:,}",
    )
    return trainable


def load_trained_vision(recipe, adapter_dir):
    """The base as training loaded it plus a finished run's adapter and trained vision parts (eval mode)."""
    from pathlib import Path

    from peft import PeftModel

    from qlora_pipe.models.loading import check_adapter_files, prepare_frozen_base

    check_adapter_files(Path(adapter_dir))
    base = prepare_frozen_base(load_vision_base(recipe, vision_parts(model_config(recipe))), checkpointing=False)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), autocast_adapter_dtype=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UserError(
            f"the adapter in {adapter_dir} does not fit its base {recipe.model.name_or_path}: {reason}"
        ) from exc
    return model.eval()


def quantized_language_weights(base_dir, recipe) -> set[str]:
    """The weights a 4-bit load of this base quantizes: the language model's linear layers, nothing else."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=recipe.model.trust_remote_code)
    return {f"{name}.weight" for name in vision_parts(config).linear["language"]}
