"""The training method and its settings: preference tuning (TRL's DPO, ORPO, KTO), reward models, the
classification task, and what the recipe's checks know of each kind of run (``KINDS``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from qlora_pipe.recipe.base import Section

METHODS = Literal["sft", "dpo", "orpo", "kto", "grpo", "reward"]
PAIR_METHODS = ("dpo", "orpo")  # trained on prompt / chosen / rejected pairs
# TRL 1.16's DPOConfig.loss_type values (trl/trainer/dpo_config.py); several combine with loss_weights.
DPO_LOSSES = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]


class PreferenceSection(Section):
    beta: float = Field(
        0.1, gt=0, description="DPO: how far the policy may move from the reference (higher: less); ORPO: lambda."
    )
    loss_type: list[DPO_LOSSES] = Field(["sigmoid"], min_length=1, description="DPO loss(es), as TRL names them.")
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference log-probs once before training (no reference forward per step)."
    )


TASKS = Literal["causal_lm", "classification", "vision"]


class ClassificationSection(Section):
    labels: list[str] | None = Field(
        None, min_length=2, description="The classes, in order (None: the training data's labels, sorted)."
    )
    text_field: str = Field("text", min_length=1, description="Column holding the text to classify.")
    label_field: str = Field("label", min_length=1, description="Column holding the label.")


class VisionSection(Section):
    tower: Literal["frozen", "lora", "full"] = Field(
        "frozen",
        description="task vision: the vision encoder left frozen in 16 bits, given LoRA, or trained whole.",
    )
    projector: Literal["frozen", "lora", "full"] = Field(
        "frozen",
        description="task vision: the projector (image features -> language model) frozen, given LoRA, or "
        "trained whole.",
    )
    longest_edge: int | None = Field(
        None,
        ge=16,
        description="task vision: resize images so their longest edge is at most this many pixels (fewer image "
        "tokens; None: the processor's own setting).",
    )


class RewardSection(Section):
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0,
        description="Method reward: weight of a penalty on the mean squared reward, keeping scores near zero "
        "(TRL's center_rewards_coefficient; None: off).",
    )


@dataclass(frozen=True)
class Kind:
    """What a recipe's checks know of a kind of run before anything loads (the rest is in qlora_pipe/methods/)."""

    noun: str  # what the run trains, in error messages
    generates: bool = True  # it answers training.preview_prompts
    continues_adapter: bool = True  # it may start from model.adapter (a finished run's adapter)
    methods: tuple[str, ...] = ()  # the only methods it trains with (empty: any)
    not_sharded: str | None = None  # why no FSDP or ZeRO-3 launch runs it (None: they do)
    planned: bool = True  # the planner knows its terms (data.max_length and micro_batch_size may be 'auto')

    def method_refusal(self, task: str, method: str) -> str | None:
        if not self.methods or method in self.methods:
            return None
        return f"task {task} trains a {self.noun} with method {' or '.join(self.methods)}, not {method}"


# A task other than causal_lm decides its kind; a causal LM's method decides it.
KINDS = {
    "classification": Kind("classifier", generates=False, continues_adapter=False, methods=("sft",)),
    "vision": Kind(
        "vision-language model",
        methods=("sft",),
        not_sharded="task vision has been run on one device only",
        planned=False,
    ),
    "reward": Kind("reward model", generates=False, continues_adapter=False),
    "grpo": Kind(
        "GRPO policy",
        not_sharded="TRL's GRPOTrainer generating from sharded weights failed in qlora-pipe's CPU check",
    ),
}
GENERATING = Kind("causal LM")


def kind_of(recipe) -> Kind:
    return KINDS.get(recipe.task) or KINDS.get(recipe.method) or GENERATING
