"""method: grpo: online RL with verifiable rewards (TRL's GRPOTrainer), its settings and its rewards.

Only the form of each reward is checked here (a built-in's parameters, a regex that compiles, a user
reward written module:function or file.py:function); finding, importing and checking the user's
function is qlora_pipe.rewards.functions.resolve_rewards, which `validate` and `train` call before
anything loads (importing user code stays out of the schema, so reading a finished run's recipe for
export never runs it).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from qlora_pipe.recipe.base import Section

# TRL 1.16's GRPOConfig.loss_type values (trl/trainer/grpo_config.py).
GRPO_LOSSES = Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]
# Built-in rewards (qlora_pipe/rewards/builtin.py) and the parameters each needs.
BUILTIN_REWARDS = ("exact_match", "token_f1", "regex", "json", "tool_call", "length")
USER_REWARD = re.compile(r"^[^:]*[^:\s]:[A-Za-z_][A-Za-z0-9_]*$")  # a path may hold spaces


class RewardSection(Section):
    function: str = Field(
        description="A built-in (exact_match, token_f1, regex, json, tool_call, length), or a user reward "
        "as module:function or path/to/file.py:function."
    )
    weight: float = Field(1.0, description="Weight of this reward in the sum GRPO ranks completions by.")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="Name in metrics (default: the function's name)."
    )
    column: str | None = Field(
        None, min_length=1, description="exact_match, token_f1: the row's reference column (default 'answer')."
    )
    pattern: str | None = Field(
        None,
        description="regex: what the whole answer must match; exact_match, token_f1: the answer is the regex's "
        "first group (0 when it does not match).",
    )
    max_tokens: int | None = Field(
        None, ge=1, description="length: completion tokens allowed before the penalty (minus excess / max_tokens)."
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return value

    @model_validator(mode="after")
    def _parameters_fit(self) -> RewardSection:
        f = self.function
        if f not in BUILTIN_REWARDS and not USER_REWARD.match(f):
            raise ValueError(
                f"function {f!r}: not a built-in ({', '.join(BUILTIN_REWARDS)}) nor module:function / file.py:function"
            )
        if f == "regex" and self.pattern is None:
            raise ValueError("function regex needs a pattern")
        if f == "length" and self.max_tokens is None:
            raise ValueError("function length needs max_tokens")
        if self.column is not None and f not in ("exact_match", "token_f1"):
            raise ValueError(f"column: only exact_match and token_f1 read a reference column, not {f}")
        if self.pattern is not None and f not in ("regex", "exact_match", "token_f1"):
            raise ValueError(f"pattern: only regex, exact_match and token_f1 take a pattern, not {f}")
        if self.max_tokens is not None and f != "length":
            raise ValueError(f"max_tokens: only length takes max_tokens, not {f}")
        return self

    def label(self) -> str:
        """The reward's name in metrics, progress and eval (unique within a recipe)."""
        return self.name or self.function.rpartition(":")[2]

    def reference_column(self) -> str | None:
        return (self.column or "answer") if self.function in ("exact_match", "token_f1") else None


class GrpoSection(Section):
    rewards: list[RewardSection] = Field(
        default_factory=list, description="The reward functions, summed with their weights (method: grpo needs one)."
    )
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (GRPO's group).")
    max_completion_length: int = Field(64, ge=1, description="Tokens generated per completion at most.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the generations.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the generations.")
    beta: float = Field(
        0.0,
        ge=0,
        description="KL penalty to the reference (the starting adapter, copied; a fresh one is the base); 0: none.",
    )
    loss_type: GRPO_LOSSES = Field("dapo", description="TRL's GRPO loss: grpo, dr_grpo, dapo, bnpo, cispo, ...")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clipping of the policy ratio (lower side; both if alone).")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping of the policy ratio (DAPO: 0.28).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the group's or the batch's reward spread, or not (Dr. GRPO)."
    )
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut at max_completion_length out of the loss (DAPO)."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_vllm(cls, raw: object) -> object:
        if isinstance(raw, dict) and any(k in raw for k in ("use_vllm", "vllm_mode")):
            raise ValueError(
                "use_vllm: vLLM generation is not supported (vLLM could not be installed where this pipeline is built "
                "and tested, so the switch was never run); generation is transformers' generate: remove the key"
            )
        return raw

    @model_validator(mode="after")
    def _unique_names(self) -> GrpoSection:
        names = [r.label() for r in self.rewards]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"rewards: two rewards named {repeated[0]!r}; give each a distinct 'name'")
        return self


def grpo_refusal(
    method: str, grpo: GrpoSection, micro_batch_size: int | str, accumulation: int, effective: int | None = None
) -> str | None:
    """Why a recipe's GRPO settings cannot run, or None (TRL's GRPOConfig would refuse them at train start).
    ``effective``: with micro_batch_size auto, the completions per step (training.effective_batch_size, default
    gradient_accumulation_steps), which auto divides into micro batches."""
    if (method == "grpo") != bool(grpo.rewards):
        return "grpo.rewards: method grpo needs at least one reward; other methods take none"
    if method != "grpo":
        return None
    if micro_batch_size == "auto":
        # auto picks a micro batch that divides the completions per step; those must be whole groups
        if effective is not None and effective % grpo.num_generations:
            return (
                f"training.effective_batch_size (default gradient_accumulation_steps): {effective} completions per "
                f"step with micro_batch_size auto must be a multiple of grpo.num_generations ({grpo.num_generations})"
            )
        return None
    # TRL samples a generation batch of micro_batch_size x accumulation completions: whole groups only.
    completions = micro_batch_size * accumulation
    if completions % grpo.num_generations:
        return (
            f"training.micro_batch_size x gradient_accumulation_steps ({completions} completions per step) must be "
            f"a multiple of grpo.num_generations ({grpo.num_generations})"
        )
    return None


def describe(grpo: GrpoSection) -> str:
    """The rewards and settings in one line (model card, docs)."""
    rewards = ", ".join(f"{r.label()} ({r.function}, weight {r.weight:g})" for r in grpo.rewards)
    return (
        f"rewards {rewards}; {grpo.num_generations} generations per prompt, at most {grpo.max_completion_length} "
        f"tokens, temperature {grpo.temperature:g}, beta {grpo.beta:g}, loss {grpo.loss_type}"
    )
