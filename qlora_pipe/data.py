"""Rows -> validated chat conversations -> the dataset the SFT trainer tokenizes and masks.

Gets a tokenizer; never loads a model. TRL renders the chat template and builds the
assistant-only loss mask; this module checks every row first, drops over-long rows with a
count (never silently), and reports what it kept.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import DataSection

log = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant"}


@dataclass
class SplitReport:
    path: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    supervised_tokens: int = 0
    total_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "dropped": dict(self.dropped),
            "total_tokens": self.total_tokens,
            "supervised_tokens": self.supervised_tokens,
        }

    def line(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        return (
            f"{self.path}: {self.rows_kept}/{self.rows_read} rows kept (dropped: {dropped}); "
            f"{self.total_tokens:,} tokens, {self.supervised_tokens:,} trained"
        )


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Parse a JSONL file; a malformed line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: invalid JSON: {exc.msg}") from exc
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def conversation_problem(row: dict[str, Any]) -> str | None:
    """Why a row is not a usable chat conversation, or None when it is."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "no 'messages' list"
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return "message without string content"
        if message.get("role") not in ROLES:
            return "unknown role"
        if not message["content"].strip():
            return "empty message"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    return None


def load_split(path: str, tokenizer, data: DataSection, limit: int | None, template: str | None):
    """Read, check, length-filter one split; returns (rows, report)."""
    report = SplitReport(path=path)
    raw_rows = read_jsonl(path)
    if limit is not None:
        raw_rows = raw_rows[:limit]
    report.rows_read = len(raw_rows)
    kept = []
    for row in raw_rows:
        problem = conversation_problem(row)
        if problem:
            report.dropped[problem] += 1
            continue
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        total, supervised = count_tokens(tokenizer, messages, template)
        if total > data.max_length:
            report.dropped[f"longer than max_length {data.max_length}"] += 1
            continue
        report.total_tokens += total
        report.supervised_tokens += supervised
        kept.append({"messages": messages})
    report.rows_kept = len(kept)
    if not kept:
        raise UserError(f"{path}: no usable rows after checks ({report.line()})")
    return kept, report


def training_chat_template(tokenizer) -> str:
    """The template TRL will mask with: the tokenizer's own if it has {% generation %} markers,
    else TRL's training variant of a known family. Refuses templates that would not train EOS."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
        is_chat_template_stop_token_trained,
    )

    template = tokenizer.chat_template
    if not has_generation_markers(template):
        try:
            template = get_training_chat_template(tokenizer) or template
        except ValueError as exc:
            raise UserError(
                "data.loss_on=assistant: the chat template has no {% generation %} markers and is not a "
                "family TRL knows; add the markers to the template or set data.loss_on: all"
            ) from exc
    if not is_chat_template_stop_token_trained(tokenizer, chat_template=template):
        raise UserError(
            "data.loss_on=assistant: the chat template leaves the end-of-turn token outside the loss mask, "
            "so the model would never learn to stop; put it inside {% generation %}...{% endgeneration %}"
        )
    return template


def count_tokens(tokenizer, messages: list[dict[str, str]], template: str | None) -> tuple[int, int]:
    """Tokens of the rendered conversation and how many of them carry loss (all, when no template)."""
    if template is None:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        return len(ids), len(ids)
    out = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        chat_template=template,
    )
    return len(out["input_ids"]), int(sum(out["assistant_masks"]))


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset
    eval: Any | None
    reports: list[SplitReport]
    system_prompt: str | None


def prepare_data(data: DataSection, tokenizer) -> PreparedData:
    """The data stage: both splits checked and filtered, with a one-line report each."""
    from datasets import Dataset

    template = None if data.loss_on == "all" else training_chat_template(tokenizer)
    train_rows, train_report = load_split(data.train_path, tokenizer, data, data.max_train_samples, template)
    reports = [train_report]
    eval_ds = None
    if data.eval_path:
        eval_rows, eval_report = load_split(data.eval_path, tokenizer, data, data.max_eval_samples, template)
        reports.append(eval_report)
        eval_ds = Dataset.from_list(eval_rows)
    for report in reports:
        log.info("data: %s", report.line())
    if train_report.supervised_tokens == 0:
        raise UserError(f"{data.train_path}: the assistant-only loss mask selects no tokens")
    first = train_rows[0]["messages"][0]
    system_prompt = first["content"] if first["role"] == "system" else None
    return PreparedData(Dataset.from_list(train_rows), eval_ds, reports, system_prompt)
