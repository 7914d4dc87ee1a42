"""task: vision: a vision-language model fine-tuned on chat rows with images (docs/vision.md).

The language model in 4-bit NF4 with LoRA, the vision tower and projector in 16 bits (frozen, LoRA or trained
whole: vision.tower, vision.projector); supervised rows whose loss is on the assistant's words only, image
tokens never trained; held-out image questions answered before and after training, against the baseline of
always giving the most frequent answer.
"""

from __future__ import annotations

from qlora_pipe.methods.base import Method


class Vision(Method):
    auto_class = base_class = "AutoModelForImageTextToText"
    verified_block_by_block = False

    def refusal(self, what: str, run) -> str | None:
        return {
            "export --unmerged": "export --unmerged: serving a vision model's adapter unmerged is not supported; "
            "export it merged (leave out --unmerged)",
        }.get(what)

    def plan_refusal(self) -> str | None:
        return (
            "plan: task vision is not planned yet (the planner counts a causal language model's terms, not image "
            "tokens or the vision tower; docs/vision.md)"
        )

    def processor(self, recipe, tokenizer):
        from qlora_pipe.vision.model import load_processor

        return load_processor(recipe, tokenizer)

    def prepare_data(self, recipe, tokenizer):
        from qlora_pipe.vision.data import prepare_vision_data

        return prepare_vision_data(recipe.data, self.processor(recipe, tokenizer), recipe.seed)

    def preview(self, recipe, tokenizer, rows: int, color: bool) -> str:
        from qlora_pipe.data.preview import vision_preview

        processor = self.processor(recipe, tokenizer)
        return vision_preview(self.prepare_data(recipe, tokenizer), processor, rows, color)

    def trainer_class(self, recipe) -> type:
        from qlora_pipe.training.trainer import PipeTrainer

        return PipeTrainer

    def trainer_config(self, recipe, arguments: dict):
        from trl import SFTConfig

        # The rows are encoded and their images are the collator's: TRL prepares nothing and drops no column.
        return SFTConfig(**arguments, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})

    def data_collator(self, recipe, tokenizer):
        from qlora_pipe.vision.collate import VisionCollator

        return VisionCollator(self.processor(recipe, tokenizer))

    def saved_processing(self, recipe, tokenizer):
        return self.processor(recipe, tokenizer)

    def load_fresh_policy(self, recipe, tokenizer):
        from qlora_pipe.vision.model import load_vision_policy

        return load_vision_policy(recipe, tokenizer)

    def load_trained(self, recipe, adapter_dir):
        from qlora_pipe.vision.model import load_trained_vision

        return load_trained_vision(recipe, adapter_dir)

    def quantized_weight_names(self, base, recipe) -> set[str]:
        from qlora_pipe.vision.model import quantized_language_weights

        return quantized_language_weights(base, recipe)

    def fidelity_rows(self, recipe, tokenizer, rows: list[dict]) -> list[dict]:
        """Each row with its pixel values, as the trained and the merged model both take them."""
        import torch

        from qlora_pipe.vision.collate import IMAGE_COLUMN, pixel_inputs, token_type_inputs

        processor = self.processor(recipe, tokenizer)
        return [
            {
                **row,
                "model_inputs": {
                    **pixel_inputs(processor, [row[IMAGE_COLUMN]]),
                    **token_type_inputs(processor, torch.tensor([row["input_ids"]])),
                },
            }
            for row in rows
        ]

    def write_export_config(self, folder, recipe, tokenizer) -> None:
        """The processor's settings beside the merged weights (the serving chat template is already there)."""
        import shutil
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory(dir=folder) as aside:
            self.processor(recipe, tokenizer).save_pretrained(aside)
            for name in ("processor_config.json", "preprocessor_config.json"):
                if (Path(aside) / name).is_file():
                    shutil.copy(Path(aside) / name, Path(folder) / name)

    def callbacks(self, recipe, run, tokenizer, data) -> list:
        if data.eval is None:
            return []
        from qlora_pipe.training.callbacks import HeldOutBeforeAfter
        from qlora_pipe.vision.answers import VISION_EVAL, image_scores, most_frequent_answer

        processor, rows = self.processor(recipe, tokenizer), list(data.eval)
        baseline = most_frequent_answer(data.train, tokenizer)
        return [
            HeldOutBeforeAfter(run.root / VISION_EVAL, lambda model: image_scores(model, processor, rows, baseline))
        ]

    def held_out_eval(self, run, recipe, data, limit, batch_size: int, merged: bool, lm_eval: bool) -> dict:
        from qlora_pipe.errors import UserError
        from qlora_pipe.vision.answers import run_vision_eval

        if lm_eval:
            raise UserError(f"eval {run.root}: --lm-eval runs text benchmarks; a vision run is scored on its images")
        return run_vision_eval(run, recipe, data, limit, merged)

    def eval_table(self, result: dict, markdown: bool = False) -> str:
        from qlora_pipe.vision.answers import scores_table

        table = f"{result['after']['rows']} held-out image questions; tuned: {result['tuned_model']}\n"
        table += scores_table(result)
        return f"```\n{table}\n```" if markdown else table

    def summary(self, recipe, run) -> dict:
        from qlora_pipe.vision.answers import read_scores

        return {
            "method": "sft",
            "task": "vision",
            "vision": recipe.vision.model_dump(mode="json"),
            "held_out": read_scores(run.root),
        }

    def card_line(self, recipe, sources: str) -> str:
        return (
            f"- Data: {sources}; chat rows with images; loss on the assistant's words (image tokens never "
            f"trained); max length {recipe.data.max_length}"
        )
