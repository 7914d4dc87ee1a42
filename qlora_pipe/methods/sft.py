"""Supervised fine-tuning: chat rows, a fresh adapter, TRL's SFTTrainer under PipeTrainer."""

from __future__ import annotations

from qlora_pipe.methods.base import Method


class SFT(Method):
    def prepare_data(self, recipe, tokenizer):
        from qlora_pipe.data.prepare import prepare_data

        return prepare_data(recipe.data, tokenizer, recipe.seed)

    def preview(self, recipe, tokenizer, rows: int, color: bool) -> str:
        from qlora_pipe.data.preview import preview_text

        return preview_text(self.prepare_data(recipe, tokenizer), tokenizer, rows, color)

    def trainer_class(self, recipe) -> type:
        from qlora_pipe.training.trainer import PipeTrainer

        return PipeTrainer

    def trainer_config(self, recipe, arguments: dict):
        from trl import SFTConfig

        return SFTConfig(**arguments)
