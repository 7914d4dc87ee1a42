"""method: grpo through TRL's GRPOTrainer: its config, its trainer with the run's guarantees, and the
held-out rewards of greedy answers before and after training.

The policy is the run's 4-bit base with its LoRA adapter. With grpo.beta > 0 the KL reference costs no
second model: TRL copies the starting adapter under the name "ref" (a fresh adapter is zero, so the
reference is the base; a continued SFT adapter makes the SFT model the reference), as for DPO.
"""

from __future__ import annotations

import dataclasses
import json

from qlora_pipe.recipe import Recipe

GRPO_EVAL = "grpo_eval.json"
# SFT settings GRPOConfig has but GRPO does not use the SFT way: TRL's own eval samples num_generations per
# held-out prompt (the pipeline scores greedy answers instead), and completions are never packed.
NOT_FOR_GRPO = ("packing", "padding_free", "max_length", "eval_on_start", "metric_for_best_model", "greater_is_better")


def grpo_config(recipe: Recipe, arguments: dict):
    from trl import GRPOConfig

    g = recipe.grpo
    accepted = {f.name for f in dataclasses.fields(GRPOConfig)}
    shared = {k: v for k, v in arguments.items() if k in accepted and k not in NOT_FOR_GRPO}
    return GRPOConfig(
        **{**shared, "eval_strategy": "no", "eval_steps": None},
        remove_unused_columns=False,  # every column reaches the rewards
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        top_p=g.top_p,
        beta=g.beta,
        loss_type=g.loss_type,
        epsilon=g.epsilon,
        epsilon_high=g.epsilon_high,
        scale_rewards=g.scale_rewards,
        mask_truncated_completions=g.mask_truncated_completions,
        reward_weights=[r.weight for r in g.rewards],
    )


def grpo_trainer_class(recipe: Recipe):
    """GRPOTrainer with the run's guarantees; its rewards are the recipe's, guarded (rewards/functions.py); each
    prompt rendered with its row's tools (compat/trl_grpo.py)."""
    from trl import GRPOTrainer

    from qlora_pipe.compat.transformers import TrainerInternals
    from qlora_pipe.compat.trl_grpo import RowToolsPrompts, quiet_unscorable_rows_notice
    from qlora_pipe.data.prompts import row_tools
    from qlora_pipe.rewards.functions import trl_rewards
    from qlora_pipe.training.trainer import RunGuarantees

    quiet_unscorable_rows_notice()

    class PipeGrpoTrainer(TrainerInternals, RunGuarantees, RowToolsPrompts, GRPOTrainer):
        tools_of_row = staticmethod(row_tools)

        def __init__(self, *args, train_dataset=None, **kwargs):
            rewards, _ = trl_rewards(recipe, list(train_dataset["prompt"]))
            super().__init__(*args, reward_funcs=rewards, train_dataset=train_dataset, **kwargs)

    return PipeGrpoTrainer


def held_out_callback(recipe: Recipe, run, tokenizer, data):
    """Held-out rewards of greedy answers before training and after it (grpo_eval.json)."""
    from qlora_pipe.evaluate.reward_scores import held_out_rewards
    from qlora_pipe.training.callbacks import HeldOutBeforeAfter

    path = run.root / GRPO_EVAL

    def score(model) -> dict:
        return held_out_rewards(model, tokenizer, recipe, data.held_out_prompts)

    return HeldOutBeforeAfter(path, score)


def grpo_summary(recipe: Recipe, run) -> dict:
    path = run.root / GRPO_EVAL
    return {
        "method": "grpo",
        "grpo": recipe.grpo.model_dump(),
        "started_from_adapter": recipe.model.adapter,
        "held_out_rewards": json.loads(path.read_text()) if path.is_file() else {},
    }
