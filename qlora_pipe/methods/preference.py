"""DPO, ORPO and KTO: preference pairs (qlora_pipe/data/preference.py; KTO also labelled rows) through TRL's
trainers. With a LoRA policy the reference costs no second model: TRL copies the starting adapter under the
name "ref" (a fresh adapter is zero, so the reference is the base; a continued SFT adapter makes the SFT model
the reference). Held-out reward accuracy (pairs) or label separation (KTO's unpaired rows), before and after."""

from __future__ import annotations

import json

from qlora_pipe.methods.base import Method
from qlora_pipe.recipe.trainer_limits import KTO_SMALLEST_MICRO_BATCH

PREFERENCE_EVAL = "preference_eval.json"


class Preference(Method):
    @property
    def smallest_micro_batch(self) -> int:  # KTO's KL term comes from the other rows of the micro batch
        return KTO_SMALLEST_MICRO_BATCH if self.name == "kto" else 1

    def plan_settings(self, recipe) -> dict:
        """Chosen and rejected rows in each micro batch; DPO and KTO also run the reference adapter (ORPO is
        reference-free)."""
        return {"sequences_per_row": 2, "reference_adapter": self.name in ("dpo", "kto")}

    def prepare_data(self, recipe, tokenizer):
        from qlora_pipe.data.preference import prepare_preference_data

        return prepare_preference_data(recipe.data, tokenizer, recipe.seed, self.name)

    def preview(self, recipe, tokenizer, rows: int, color: bool) -> str:
        from qlora_pipe.data.preview import preference_preview_text

        return preference_preview_text(self.prepare_data(recipe, tokenizer), tokenizer, rows)

    def trainer_class(self, recipe) -> type:
        from qlora_pipe.training.trainer import preference_trainer_class

        return preference_trainer_class(self.name)

    def trainer_config(self, recipe, arguments: dict):
        """DPOConfig, KTOConfig or ORPOConfig: the shared arguments they have (not SFT's packing and padding-free),
        the data's max_length, and the method's own."""
        import dataclasses

        p = recipe.preference
        if self.name == "orpo":  # reference-free: beta is ORPO's lambda; no loss_type or reference settings
            from qlora_pipe.compat.trl import orpo_config

            config, extra = orpo_config(), {"beta": p.beta}
        elif self.name == "kto":  # KTO's default loss; TRL keeps its batches in order for the KL estimate
            from trl import KTOConfig

            config, extra = KTOConfig, {"beta": p.beta, "precompute_ref_log_probs": p.precompute_ref_log_probs}
        else:
            from trl import DPOConfig

            config = DPOConfig
            extra = {
                "beta": p.beta,
                "loss_type": list(p.loss_type),
                "precompute_ref_log_probs": p.precompute_ref_log_probs,
            }
        arguments = {**arguments, "max_length": recipe.data.max_length}
        accepted = {f.name for f in dataclasses.fields(config)}
        arguments = {k: v for k, v in arguments.items() if k in accepted and k not in ("packing", "padding_free")}
        return config(**arguments, **extra)

    def callbacks(self, recipe, run, tokenizer, data) -> list:
        if data.eval is None:
            return []
        from qlora_pipe.evaluate.reward_accuracy import held_out_scores
        from qlora_pipe.training.callbacks import HeldOutBeforeAfter

        path = run.root / PREFERENCE_EVAL
        return [HeldOutBeforeAfter(path, lambda model: held_out_scores(model, tokenizer, data.eval))]

    def held_out_eval(self, run, recipe, data, limit, batch_size: int, merged: bool, lm_eval: bool) -> dict:
        """Reward accuracy (or label separation) of the base, the starting adapter and the tuned adapter."""
        from qlora_pipe.errors import UserError
        from qlora_pipe.evaluate.preference_eval import run_preference_eval

        if merged or lm_eval:
            raise UserError(
                f"eval {run.root}: --merged and --lm-eval are for sft runs; a {self.name} run is scored on pairs"
            )
        return run_preference_eval(run, recipe, data, limit)

    def eval_table(self, result: dict, markdown: bool = False) -> str:
        from qlora_pipe.evaluate.preference_eval import preference_table

        return f"```\n{preference_table(result)}\n```" if markdown else preference_table(result)

    def summary(self, recipe, run) -> dict:
        path = run.root / PREFERENCE_EVAL
        scores = json.loads(path.read_text()) if path.is_file() else {}
        unpaired = "label_auc" in scores.get("before", {})
        return {
            "method": self.name,
            "preference": recipe.preference.model_dump(),
            "started_from_adapter": recipe.model.adapter,
            ("held_out_label_separation" if unpaired else "held_out_reward_accuracy"): scores,
        }

    def fidelity_rows(self, recipe, tokenizer, rows: list[dict]) -> list[dict]:
        from qlora_pipe.data.preference import chosen_rows

        return chosen_rows(rows, tokenizer)  # each pair's prompt with its chosen answer

    def card_line(self, recipe, sources: str) -> str:
        return (
            f"- Method: {self.name.upper()} on preference pairs ({sources}), beta {recipe.preference.beta}, "
            f"loss {', '.join(recipe.preference.loss_type)}"
            f"{', continuing the adapter of ' + recipe.model.adapter if recipe.model.adapter else ''}"
        )
