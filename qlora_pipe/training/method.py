"""Where the adapter a run trains starts: a fresh one (the method's own, qlora_pipe/methods/) or
``model.adapter``, a finished run's adapter continued on the same 4-bit base. What else differs between
methods is in qlora_pipe/methods/."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import Recipe

log = logging.getLogger(__name__)


def starting_adapter(recipe: Recipe) -> Path | None:
    """The adapter folder named by model.adapter, checked: it exists and was trained on this base."""
    if recipe.model.adapter is None:
        return None
    from qlora_pipe.training.adapter_start import check_start_run

    folder = Path(recipe.model.adapter)
    check_start_run(recipe, folder)  # a finished run, its adapter whole, a text-generation adapter
    config = folder / "adapter_config.json"
    base = json.loads(config.read_text()).get("base_model_name_or_path", "")
    from qlora_pipe.models.base_record import check_same_base
    from qlora_pipe.models.gguf_source import source_of
    from qlora_pipe.models.loading import model_location
    from qlora_pipe.runs import RunDir

    wanted = model_location(recipe.model.name_or_path)  # a GGUF base: the folder converted from it
    converted = [source_of(f) for f in (base, wanted)]  # both converted from GGUF files: the same file's?
    same = (
        base in (wanted, recipe.model.name_or_path)
        or (Path(base).exists() and Path(wanted).exists() and Path(base).resolve() == Path(wanted).resolve())
        or (all(converted) and converted[0]["sha256"] == converted[1]["sha256"])
    )
    if not same:
        raise UserError(f"model.adapter: {folder} was trained on {base}, not on model.name_or_path {wanted}")
    check_same_base(RunDir(folder), recipe, "model.adapter:")  # the same name, but is it the same weights?
    return folder


def load_policy(recipe: Recipe, tokenizer):
    """The 4-bit base with the adapter to train: model.adapter's (trainable), else a fresh one."""
    from qlora_pipe.models.loading import TrainableModel, load_base_model, prepare_frozen_base

    folder = starting_adapter(recipe)
    if folder is None:
        from qlora_pipe.methods import method_for

        return method_for(recipe).load_fresh_policy(recipe, tokenizer)
    from peft import PeftModel

    base = load_base_model(recipe)
    if base.config.pad_token_id is None or base.config.pad_token_id == tokenizer.eos_token_id:
        base.config.pad_token_id = tokenizer.pad_token_id
    base = prepare_frozen_base(base, recipe.training.gradient_checkpointing)
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("continuing the adapter of %s: %s trainable params", folder, f"{trainable:,}")
    return TrainableModel(model, trainable, total)
