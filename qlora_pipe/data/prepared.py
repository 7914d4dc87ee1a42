"""What the data stage hands to training: tokenized splits with labels, and the report of every row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora_pipe.data.report import SplitReport

IGNORE = -100


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids and labels
    eval: Any | None
    reports: list[SplitReport]
    system_prompt: str | None
    fingerprint: str | None = None
    cache_hit: bool = False
    classes: list[str] | None = None  # task: classification: the class names, in label-index order
    held_out_prompts: Any | None = None  # method: grpo: held-out prompt rows, scored by greedy answers' rewards
