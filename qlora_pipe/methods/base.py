"""What a stage may ask of a training method, with the answers that most methods share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Method:
    """A training method (``recipe.method``, or ``task: classification``). Subclasses answer differently."""

    smallest_micro_batch = 1  # the least micro batch the method can train with
    auto_class = "AutoModelForCausalLM"  # what loads the trained model (model cards)
    base_class = "AutoModelForCausalLM"  # what builds the base's skeleton (the export's layer names)
    kept_unquantized: tuple[str, ...] = ()  # modules of its own a 4-bit load keeps in 16-bit (a classifier's head)
    serves_chat = True  # a chat model: a chat template, vLLM LoRA serving
    reads_own_check_rows = False  # the export's check reads its own rows (not the run's eval rows, beforehand)
    verified_block_by_block = True  # a merged model too large to hold is checked a decoder block at a time

    def __init__(self, name: str) -> None:
        self.name = name

    def validate(self, recipe) -> None:
        """`qlora-pipe validate`: what only the method can check before anything loads (raises UserError)."""

    def prepare_data(self, recipe, tokenizer) -> Any:
        """The run's data stage: tokenized, checked and split rows (PreparedData or the method's own)."""
        raise NotImplementedError

    def finished_run_data(self, recipe, tokenizer, run=None) -> Any:
        """The data stage again, after training (``run``: the finished run, whose records it may read)."""
        return self.prepare_data(recipe, tokenizer)

    def preview(self, recipe, tokenizer, rows: int, color: bool) -> str:
        """`qlora-pipe data --preview N`: the data report and N rows as training sees them."""
        raise NotImplementedError

    def with_data(self, recipe, data) -> Any:
        """The recipe with what the data stage found (a classifier's classes); unchanged by default."""
        return recipe

    def trainer_class(self, recipe) -> type:
        raise NotImplementedError

    def data_collator(self, recipe, tokenizer) -> Any:
        """The trainer's data collator (None: the trainer's own)."""
        return None

    def saved_processing(self, recipe, tokenizer) -> Any:
        """What the run saves beside its adapter for chat, eval and export to load: the tokenizer, or a
        processor that holds it."""
        return tokenizer

    def trainer_config(self, recipe, arguments: dict) -> Any:
        """The trainer's config from the arguments every method shares (training/config.py's sft_arguments),
        those the config has, plus the method's own."""
        raise NotImplementedError

    def load_fresh_policy(self, recipe, tokenizer) -> Any:
        """The 4-bit base with a fresh adapter to train (TrainableModel)."""
        from qlora_pipe.models.loading import load_trainable_model

        return load_trainable_model(recipe, tokenizer)[1]

    def load_trained(self, recipe, adapter_dir) -> Any:
        """The base as training loaded it plus a finished run's adapter (eval mode): what chat, eval and the
        export's check run as the trained model."""
        from qlora_pipe.models.loading import load_trained_model

        return load_trained_model(recipe, adapter_dir)

    def quantized_weight_names(self, base, recipe) -> set[str] | None:
        """The base weights a 4-bit load quantizes, when the method knows them itself (None: every linear layer
        of the causal LM but the ones transformers keeps out)."""
        return None

    def callbacks(self, recipe, run, tokenizer, data) -> list:
        """The method's own trainer callbacks (held-out scores before and after training)."""
        return []

    def summary(self, recipe, run) -> dict:
        """The method and its settings for summary.json, with its held-out scores."""
        return {"method": self.name}

    def batch_probe(
        self, recipe, model, effective: int, length: int
    ) -> tuple[Callable[[int], None], Callable[[int], int]] | None:
        """For ``micro_batch_size: auto``: a probe that runs one micro batch of a size (raising
        torch.OutOfMemoryError when it does not fit), and the rounding of a size to one the method takes.
        None: one forward and backward of that many rows (training/micro_batch.py's try_micro_batch)."""
        return None

    def held_out_eval(self, run, recipe, data, limit, batch_size: int, merged: bool, lm_eval: bool) -> dict | None:
        """`qlora-pipe eval` for a method scored its own way (None: the answers-and-loss evaluation of SFT)."""
        return None

    def eval_table(self, result: dict, markdown: bool = False) -> str | None:
        """`held_out_eval`'s scores as printed by `qlora-pipe eval` or, with ``markdown``, in the model card."""
        return None

    def plan_settings(self, recipe) -> dict:
        """The planner's PlanSettings fields that differ for this method (qlora_pipe/plan/terms.py)."""
        return {}

    def card_line(self, recipe, sources: str) -> str:
        """The model card's line on the data and method (supervised rows by default)."""
        return f"- Data: {sources}; loss on {recipe.data.loss_on} tokens; max length {recipe.data.max_length}"

    def card_load_arguments(self, recipe) -> str:
        """Extra from_pretrained arguments in the model card's loading snippet."""
        return ""

    def refusal(self, what: str, run) -> str | None:
        """Why a command (``what``: "chat", "export --unmerged", "export --format gguf") does not apply to this
        method's runs; or None."""
        return None

    def plan_refusal(self) -> str | None:
        """Why the planner cannot plan this method's runs (None: it can)."""
        return None

    def plan_note(self) -> str | None:
        """A note under `qlora-pipe plan`'s table when its terms describe this method only approximately."""
        return None

    def unused_base_tensors(self, base, shards, recipe) -> set[str]:
        """Base tensors the merged model does not keep (a classifier's LM head)."""
        return set()

    def write_export_config(self, folder, recipe, tokenizer) -> None:
        """What the merged folder needs beyond the base's config (a classifier's labels)."""

    def check_merged(self, recipe, run, merged_dir, dtype) -> dict | None:
        """The export's check when the method has its own (None: the causal LM's, logits on held-out rows)."""
        return None

    def fidelity_rows(self, recipe, tokenizer, rows: list[dict]) -> list[dict]:
        """The export check's rows from the held-out rows of the method's data: as training saw them."""
        return rows
