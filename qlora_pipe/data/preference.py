"""The data stage for preference tuning (method: dpo): prompt / chosen / rejected rows, checked and reported.

A row's prompt is a string or a conversation (system and earlier turns allowed, the last turn the
user's); chosen and rejected are strings or assistant messages, or, with no prompt column, whole
conversations whose shared turns are the prompt. TRL's DPOTrainer renders them with the
run's chat template, so the end-of-turn token closes each completion and is trained on. Rows are
dropped, and counted by reason, when a completion is empty, chosen and rejected are the same, or the
prompt with the longer completion does not fit data.max_length. Answers are never cut (no completion
loses its end of turn): with data.overlength: truncate the prompt's earliest turns go first, and the
pair is dropped only when its last user turn with the answer still does not fit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from typing import Any

from qlora_pipe.data.prepare import collect, hold_out
from qlora_pipe.data.prepared import PreparedData
from qlora_pipe.data.report import SplitReport, require_eval_rows
from qlora_pipe.data.template_errors import row_drop_reason
from qlora_pipe.errors import UserError
from qlora_pipe.machine.dist import is_main_process
from qlora_pipe.recipe import DataSection

log = logging.getLogger(__name__)


def _messages(value: Any, role: str) -> list[dict[str, str]] | None:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict) and {"role", "content"} <= set(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


PROMPT_ROLES = {"system", "user", "assistant"}


def prompt_problem(prompt: list[dict[str, Any]]) -> str | None:
    """Why the prompt's turns cannot be rendered, or None: every turn a known role with text content (a
    null, number or list content would otherwise end in the chat template's UndefinedError mid-run)."""
    if any(m["role"] not in PROMPT_ROLES for m in prompt):
        return "the prompt has a turn that is not system, user or assistant"
    if not all(isinstance(m["content"], str) for m in prompt):
        return "the prompt has a turn whose content is not text"
    return None


def implicit_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """Chosen and rejected as whole conversations with no prompt column (the layout of many Hub preference
    sets): the turns they share become the prompt (TRL's extract_prompt). Plain strings are left alone."""
    chosen, rejected = _messages(row["chosen"], "assistant"), _messages(row["rejected"], "assistant")
    if not isinstance(row["chosen"], list) or chosen is None or rejected is None or len(chosen) < 2:
        return row
    from trl import extract_prompt

    split = extract_prompt({"chosen": chosen, "rejected": rejected})
    return {**row, **split} if split["prompt"] else row


def to_pair(row: dict[str, Any]) -> dict[str, Any] | str:
    """The row as TRL's conversational preference example, or the reason it is dropped."""
    if "prompt" not in row and {"chosen", "rejected"} <= set(row):
        row = implicit_prompt(row)
    if not {"prompt", "chosen", "rejected"} <= set(row):
        return "not a prompt/chosen/rejected row"
    prompt = _messages(row["prompt"], "user")
    chosen, rejected = _messages(row["chosen"], "assistant"), _messages(row["rejected"], "assistant")
    if prompt is None or chosen is None or rejected is None:
        return "prompt, chosen or rejected is not text or chat messages"
    if problem := prompt_problem(prompt):
        return problem
    if prompt[-1]["role"] != "user":
        return "the prompt does not end with a user turn"
    if any(m["role"] != "assistant" for m in chosen + rejected):
        return "chosen or rejected has a turn that is not the assistant's"
    if not all(isinstance(m["content"], str) and m["content"].strip() for m in chosen + rejected):
        return "empty chosen or rejected answer"
    if chosen == rejected:
        return "chosen and rejected are identical"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def to_kto_row(row: dict[str, Any]) -> dict[str, Any] | str:
    """KTO's unpaired row (prompt, completion, label: desirable or not), or the reason it is dropped;
    a prompt/chosen/rejected pair is kept as a pair (TRL's KTOTrainer splits it into two rows)."""
    if {"chosen", "rejected"} <= set(row):
        return to_pair(row)
    if not {"prompt", "completion", "label"} <= set(row):
        return "not a prompt/completion/label row (nor a prompt/chosen/rejected pair)"
    prompt, completion = _messages(row["prompt"], "user"), _messages(row["completion"], "assistant")
    if prompt is None or completion is None:
        return "prompt or completion is not text or chat messages"
    if problem := prompt_problem(prompt):
        return problem
    if prompt[-1]["role"] != "user":
        return "the prompt does not end with a user turn"
    if any(m["role"] != "assistant" for m in completion):
        return "the completion has a turn that is not the assistant's"
    if not all(isinstance(m["content"], str) and m["content"].strip() for m in completion):
        return "empty completion"
    if not isinstance(row["label"], bool):
        return "label is not true or false"
    return {"prompt": prompt, "completion": completion, "label": row["label"]}


def lengths(pair: dict[str, Any], tokenizer) -> tuple[int, int, int]:
    """Tokens of the rendered prompt, and of the whole chosen and rejected conversations (a KTO row: its
    completion twice)."""

    def count(messages: list[dict[str, str]], prompt: bool) -> int:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True, return_dict=True)
        return len(ids["input_ids"])

    if "completion" in pair:
        whole = count(pair["prompt"] + pair["completion"], False)
        return count(pair["prompt"], True), whole, whole
    return (
        count(pair["prompt"], True),
        count(pair["prompt"] + pair["chosen"], False),
        count(pair["prompt"] + pair["rejected"], False),
    )


def shorten_prompt(pair: dict[str, Any], tokenizer, max_length: int) -> dict[str, Any] | None:
    """The pair with its prompt's earliest turns removed (a system message kept; the prompt still starts
    with a user turn) until it fits max_length; None when even the last user turn does not fit. Answers are
    never cut: their end of turn is what preference tuning compares."""
    prompt = pair["prompt"]
    system = prompt[:1] if prompt[0]["role"] == "system" else []
    turns = prompt[len(system) :]
    while len(turns) > 1:
        turns = turns[1:]
        while turns[0]["role"] != "user":
            turns = turns[1:]
        shorter = {**pair, "prompt": system + turns}
        if max(lengths(shorter, tokenizer)[1:]) <= max_length:
            return shorter
    return None


def fitted(pair: dict[str, Any], tokenizer, data: DataSection, report: SplitReport) -> tuple[dict, int, int, int]:
    """The pair (its prompt cut to fit max_length with overlength: truncate, where that can be) and its lengths."""
    prompt, chosen, rejected = lengths(pair, tokenizer)
    if max(chosen, rejected) > data.max_length and data.overlength == "truncate":
        shorter = shorten_prompt(pair, tokenizer, data.max_length)
        if shorter is not None:
            pair, report.truncated = shorter, report.truncated + 1
            prompt, chosen, rejected = lengths(pair, tokenizer)
    return pair, prompt, chosen, rejected


def check_split(pairs: list[dict[str, Any]], tokenizer, data: DataSection, report: SplitReport):
    from datasets import Dataset

    max_length = data.max_length
    kept, totals, trained = [], [], []
    for number, pair in enumerate(pairs, start=1):
        try:
            pair, prompt, chosen, rejected = fitted(pair, tokenizer, data, report)
        except Exception as exc:  # the chat template's refusal or bug on this row: dropped and counted
            reason = row_drop_reason(exc)
            if reason is None:
                raise
            report.dropped[reason] += 1
            continue
        if max(chosen, rejected) > max_length:
            if data.overlength == "error":
                raise UserError(
                    f"{report.name}: row {number} is longer than data.max_length {max_length} "
                    f"({max(chosen, rejected)} tokens); set data.overlength: drop or truncate"
                )
            reason = "longer than data.max_length" + (" with the prompt cut" if data.overlength == "truncate" else "")
            report.dropped[reason] += 1
            continue
        kept.append(pair)
        single = "completion" in pair
        totals.append(chosen if single else chosen + rejected - prompt)
        trained.append(chosen - prompt if single else chosen + rejected - 2 * prompt)  # the answers' tokens
    report.rows_kept = len(kept)
    report.add_lengths(totals, trained)
    return Dataset.from_list(kept) if kept else None


def fingerprint(data: DataSection, tokenizer, seed: int, pairs: list) -> str:
    """Settings, tokenizer, template and the pairs themselves: a resumed run refuses changed data."""
    parts = [data.model_dump_json(), getattr(tokenizer, "name_or_path", ""), str(tokenizer.chat_template), str(seed)]
    return hashlib.sha256(json.dumps([parts, pairs], sort_keys=True).encode()).hexdigest()[:24]


def prepare_preference_data(
    data: DataSection, tokenizer, seed: int = 42, method: str = "dpo", train_name: str = "train"
) -> PreparedData:
    """Read, check, split and report preference pairs (no cache: rendering is TRL's, at train start).
    ``train_name``: what the first split is called (eval --data reads its file as that split)."""
    from qlora_pipe.data.chat_templates import require_chat_template

    require_chat_template(tokenizer, getattr(tokenizer, "name_or_path", "the model"))
    rng = random.Random(seed)
    train_report, eval_report = SplitReport(train_name), SplitReport("eval")
    convert = to_kto_row if method == "kto" else to_pair
    train = collect(data.train_sources(), data, rng, train_report, convert)[: data.max_train_samples]
    held_out = collect(data.held_out_sources(), data, rng, eval_report, convert) if data.held_out_sources() else []
    if len({frozenset(row) for row in train + held_out}) > 1:
        raise UserError(
            f"{train_report.what()}: mixes KTO rows (prompt/completion/label) and pairs (prompt/chosen/rejected)"
        )
    train, held_out = hold_out(train, held_out, data, rng, eval_report)
    train_ds = check_split(train, tokenizer, data, train_report)
    if train_ds is None:
        rows = "KTO rows (prompt/completion/label)" if method == "kto" else "preference pairs"
        raise UserError(f"{train_report.what()}: no usable {rows} ({train_report.line()})")
    eval_ds = check_split(held_out, tokenizer, data, eval_report) if held_out else None
    require_eval_rows(data, len(eval_ds or ()), eval_report)
    reports = [train_report] + ([eval_report] if eval_ds is not None else [])
    first = train_ds[0]["prompt"]
    system = first[0]["content"] if first[0]["role"] == "system" else None
    for report in reports:
        if is_main_process():
            log.info("data: %s", report.line())
    return PreparedData(train_ds, eval_ds, reports, system, fingerprint(data, tokenizer, seed, [train, held_out]))


def chosen_rows(pairs, tokenizer) -> list[dict[str, list[int]]]:
    """Each pair's prompt + chosen answer as a supervised row (labels on the answer only), for checks that
    score a model the way SFT rows are scored (the export's fidelity check)."""
    from qlora_pipe.data.prepared import IGNORE

    rows = []
    for pair in pairs:
        render = tokenizer.apply_chat_template
        start = len(render(pair["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        answer = pair["chosen"] if "chosen" in pair else pair["completion"]
        ids = list(render(pair["prompt"] + answer, tokenize=True, return_dict=True)["input_ids"])
        rows.append({"input_ids": ids, "labels": [IGNORE] * start + ids[start:]})
    return rows
