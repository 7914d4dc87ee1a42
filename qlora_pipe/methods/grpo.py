"""GRPO: prompts (with their tools) and rewards; the generation batch is probed before the micro batch."""

from __future__ import annotations

from collections.abc import Callable

from qlora_pipe.methods.base import Method


class GRPO(Method):
    def prepare_data(self, recipe, tokenizer):
        from qlora_pipe.data.prompts import prepare_prompt_data

        return prepare_prompt_data(recipe, tokenizer)

    def validate(self, recipe) -> None:
        """User rewards imported and their signatures checked, before anything loads."""
        from qlora_pipe.rewards.functions import resolve_rewards

        resolve_rewards(recipe)

    def plan_settings(self, recipe) -> dict:
        from qlora_pipe.plan.grpo_terms import grpo_settings

        return grpo_settings(recipe)

    def preview(self, recipe, tokenizer, rows: int, color: bool) -> str:
        from qlora_pipe.data.prompts import prompt_preview_text

        return prompt_preview_text(self.prepare_data(recipe, tokenizer), tokenizer, recipe, rows)

    def finished_run_data(self, recipe, tokenizer, run=None):
        """The prompts read with the columns the run's data report recorded for each reward: no reward code
        is imported."""
        if run is None:
            return self.prepare_data(recipe, tokenizer)
        from qlora_pipe.data.prompts import prepare_prompt_data, recorded_reward_columns

        return prepare_prompt_data(recipe, tokenizer, recorded=recorded_reward_columns(run.data_report))

    def trainer_class(self, recipe) -> type:
        from qlora_pipe.training.grpo import grpo_trainer_class

        return grpo_trainer_class(recipe)

    def trainer_config(self, recipe, arguments: dict):
        from qlora_pipe.training.grpo import grpo_config

        return grpo_config(recipe, arguments)

    def callbacks(self, recipe, run, tokenizer, data) -> list:
        from qlora_pipe.training.grpo import held_out_callback

        return [held_out_callback(recipe, run, tokenizer, data)] if data.held_out_prompts is not None else []

    def held_out_eval(self, run, recipe, data, limit, batch_size: int, merged: bool, lm_eval: bool) -> dict:
        """Greedy answers' rewards of the base, the starting adapter and the tuned adapter."""
        from qlora_pipe.errors import UserError
        from qlora_pipe.evaluate.grpo_eval import run_grpo_eval

        if merged or lm_eval:
            raise UserError(
                f"eval {run.root}: --merged and --lm-eval are for sft runs; a grpo run is scored by rewards"
            )
        return run_grpo_eval(run, recipe, data, limit, batch_size)

    def eval_table(self, result: dict, markdown: bool = False) -> str:
        from qlora_pipe.evaluate.reward_scores import rewards_table

        return rewards_table(result["columns"], markdown=markdown)

    def summary(self, recipe, run) -> dict:
        from qlora_pipe.training.grpo import grpo_summary

        return grpo_summary(recipe, run)

    def batch_probe(
        self, recipe, model, effective: int, length: int
    ) -> tuple[Callable[[int], None], Callable[[int], int]]:
        """The generation batch first; then micro batches that divide it (whole groups per step: checked at
        validate, recipe/grpo.py)."""
        from qlora_pipe.training.micro_batch import largest_divisor, probe_generation, try_grpo_step

        g = recipe.grpo
        probe_generation(model, effective, length)
        completion = g.max_completion_length
        return (
            lambda n: try_grpo_step(model, n, length, completion, g.beta > 0, g.temperature),
            lambda n: largest_divisor(effective, n),
        )

    def fidelity_rows(self, recipe, tokenizer, rows: list[dict]) -> list[dict]:
        from qlora_pipe.data.prompts import prompt_rows

        return prompt_rows(rows, tokenizer)  # the rendered prompt, every token compared

    def card_line(self, recipe, sources: str) -> str:
        from qlora_pipe.recipe.grpo import describe

        return (
            f"- Method: GRPO on prompts ({sources}): {describe(recipe.grpo)}"
            f"{', continuing the adapter of ' + recipe.model.adapter if recipe.model.adapter else ''}"
        )
