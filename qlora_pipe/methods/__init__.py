"""One module per training method: what a stage asks of a method is asked of the object ``method_for`` returns.

    base.py            Method: the questions every stage may ask, with the answers most methods share
    sft.py             supervised fine-tuning (TRL's SFTTrainer under PipeTrainer)
    preference.py      DPO, ORPO and KTO on preference pairs (or KTO's labelled rows)
    grpo.py            GRPO on prompts with rewards
    classification.py  a sequence classifier (task: classification) with a trained head
    reward.py          a reward model (a scalar head) on preference pairs, TRL's RewardTrainer

A stage calls ``method_for(recipe).prepare_data(...)``, ``.trainer_class(...)``, ``.callbacks(...)`` and so
on, and holds no branch on the method's name: adding a method is a module here and a line in ``_REGISTRY``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qlora_pipe.methods.base import Method


def _registry() -> dict[str, type[Method]]:
    from qlora_pipe.methods.grpo import GRPO
    from qlora_pipe.methods.preference import Preference
    from qlora_pipe.methods.reward import Reward
    from qlora_pipe.methods.sft import SFT

    return {"sft": SFT, "dpo": Preference, "orpo": Preference, "kto": Preference, "grpo": GRPO, "reward": Reward}


def method_for(recipe) -> Method:
    """The method object of a recipe (its ``task`` first: a classifier trains with supervised rows)."""
    if recipe.task == "classification":
        from qlora_pipe.methods.classification import Classification

        return Classification(recipe.method)
    return _registry()[recipe.method](recipe.method)
