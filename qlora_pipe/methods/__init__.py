"""One module per training method: what a stage asks of a method is asked of the object ``method_for`` returns.

    base.py            Method: the questions every stage may ask, with the answers most methods share
    sft.py             supervised fine-tuning (TRL's SFTTrainer under PipeTrainer)
    preference.py      DPO, ORPO and KTO on preference pairs (or KTO's labelled rows)
    grpo.py            GRPO on prompts with rewards
    classification.py  a sequence classifier (task: classification) with a trained head
    vision.py          a vision-language model (task: vision): images in the rows, the language model in 4-bit
    reward.py          a reward model (a scalar head) on preference pairs, TRL's RewardTrainer

A stage calls ``method_for(recipe).prepare_data(...)``, ``.trainer_class(...)``, ``.callbacks(...)`` and so
on, and holds no branch on the method's name: adding a method is a module here and a line in ``REGISTRY``
(plus its name in recipe/methods.py's METHODS). The stages import only this package's ``method_for`` and
``base.Method``: the method modules sit above the stages they compose, as PEFT's tuners sit above its
registry, and are found by name.
"""

from __future__ import annotations

from importlib import import_module

from qlora_pipe.methods.base import Method

# Each method's class, by module and name, found when a recipe asks for it. The stages depend only on Method
# (base.py); a method module depends on the stages it composes (the layer order in tests/test_architecture.py).
REGISTRY = {
    "sft": "qlora_pipe.methods.sft:SFT",
    "dpo": "qlora_pipe.methods.preference:Preference",
    "orpo": "qlora_pipe.methods.preference:Preference",
    "kto": "qlora_pipe.methods.preference:Preference",
    "grpo": "qlora_pipe.methods.grpo:GRPO",
    "reward": "qlora_pipe.methods.reward:Reward",
}
TASKS = {
    "classification": "qlora_pipe.methods.classification:Classification",
    "vision": "qlora_pipe.methods.vision:Vision",
}


def method_for(recipe) -> Method:
    """The method object of a recipe (its ``task`` first: a classifier trains with supervised rows)."""
    module, name = (TASKS.get(recipe.task) or REGISTRY[recipe.method]).split(":")
    return getattr(import_module(module), name)(recipe.method)
