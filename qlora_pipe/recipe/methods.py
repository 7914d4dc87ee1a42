"""The training method and its settings: preference tuning (TRL's DPO, ORPO, KTO) and the classification task."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qlora_pipe.recipe.base import Section

METHODS = Literal["sft", "dpo", "orpo", "kto", "grpo"]
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


TASKS = Literal["causal_lm", "classification"]


class ClassificationSection(Section):
    labels: list[str] | None = Field(
        None, min_length=2, description="The classes, in order (None: the training data's labels, sorted)."
    )
    text_field: str = Field("text", min_length=1, description="Column holding the text to classify.")
    label_field: str = Field("label", min_length=1, description="Column holding the label.")
