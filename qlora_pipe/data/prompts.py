"""The data stage of method: grpo: prompt rows, checked and reported; the model writes the answers.

A row's ``prompt`` is a string (one user turn) or a conversation (system and earlier turns allowed, the
last turn the user's); TRL renders it with the run's chat template and a generation prompt. Every other
column is handed to the rewards (lists and objects as JSON text: Arrow would otherwise merge the keys of
different rows' objects). A ``tools`` column (function schemas, as SFT tool rows list them) is rendered
into the prompt by the chat template, so the model sees the functions it may call; a template that cannot
render tools is refused in one line, as for SFT. Rows are dropped, and counted by reason, when the prompt
is missing or not text, when the tools list is malformed, when a column a reward needs is missing, or
when the rendered prompt leaves no room in data.max_length for grpo.max_completion_length generated tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

from qlora_pipe.data.conversation import check_tools
from qlora_pipe.data.prepare import collect, hold_out
from qlora_pipe.data.prepared import PreparedData
from qlora_pipe.data.report import SplitReport, require_eval_rows
from qlora_pipe.data.template_errors import row_drop_reason
from qlora_pipe.errors import UserError
from qlora_pipe.machine.dist import is_main_process

log = logging.getLogger(__name__)
ROLES = {"system", "user", "assistant"}


def to_prompt_row(row: dict[str, Any], needed: dict[str, str]) -> dict[str, Any] | str:
    """The row as TRL's conversational prompt row (other columns kept), or the reason it is dropped.
    ``needed``: column -> the reward that reads it."""
    if "prompt" not in row:
        return "no prompt column"
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
        return "the prompt is not text or chat messages"
    if any(m.get("role") not in ROLES or not isinstance(m.get("content"), str) for m in prompt):
        return "the prompt has a turn that is not system, user or assistant text"
    if prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
        return "the prompt does not end with a non-empty user turn"
    for column, reward in needed.items():
        if row.get(column) is None:
            return f"no {column} column (reward {reward} reads it)"
    extra = {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items() if k != "prompt"}
    if "tools" in row:
        functions = check_tools(row["tools"])
        if isinstance(functions, str):
            return functions
        extra["tools"] = json.dumps(functions) if functions else None
    return {"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt], **extra}


def row_tools(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The functions of a prompt row (stored as JSON text), as the chat template takes them; None: none."""
    tools = row.get("tools")
    return (json.loads(tools) if isinstance(tools, str) else tools) or None


def render_prompt(row: dict[str, Any], tokenizer, tokenize: bool = True) -> list[int] | str:
    """The prompt as the model sees it: the chat template with the row's tools and the generation prompt."""
    tools = row_tools(row)
    extra = {"tools": tools} if tools else {}
    if not tokenize:
        return tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False, **extra)
    out = tokenizer.apply_chat_template(
        row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True, **extra
    )
    return list(out["input_ids"])


def check_tools_render(rows: list[dict[str, Any]], tokenizer, data) -> None:
    """Refuse rows with tools on a template that cannot render them (the SFT check, the same line)."""
    from dataclasses import replace

    from qlora_pipe.data.chat_masks import check_template_for, probe_template

    with_tools = [{"tools": row_tools(r), "messages": r["prompt"]} for r in rows if row_tools(r)]
    if with_tools:  # a prompt is never trained: an empty thinking block the template adds is no concern here
        check_template_for(replace(probe_template(tokenizer, None), adds_empty_think=False), with_tools, data)


def check_split(rows: list[dict[str, Any]], tokenizer, recipe, report: SplitReport):
    from datasets import Dataset

    room = recipe.data.max_length - recipe.grpo.max_completion_length
    columns = list(dict.fromkeys(k for row in rows for k in row))  # Arrow keeps only the first row's keys
    rows = [{k: row.get(k) for k in columns} for row in rows]
    kept, lengths = [], []
    for number, row in enumerate(rows, start=1):
        try:
            length = len(render_prompt(row, tokenizer))
        except Exception as exc:  # the chat template's refusal or bug on this row: dropped and counted
            reason = row_drop_reason(exc)
            if reason is None:
                raise
            report.dropped[reason] += 1
            continue
        if length > room:
            why = f"prompt longer than data.max_length - grpo.max_completion_length ({room} tokens)"
            if recipe.data.overlength == "error":
                raise UserError(f"{report.name}: row {number}: {why}: {length} tokens")
            report.dropped[why] += 1
            continue
        kept.append(row)
        lengths.append(length)
    report.add_lengths(lengths, [0] * len(lengths))  # nothing is trained on the prompt
    report.prompt_rows = True
    report.columns = [c for c in columns if c != "prompt"]
    if with_tools := sum(1 for row in kept if row_tools(row)):
        report.conversation_parts["prompts_with_tools"] = with_tools
    return Dataset.from_list(kept) if kept else None


def reward_columns(recipe, recorded: dict[str, list[str]] | None = None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """What the rewards read: each reward's label -> the row columns it reads (a built-in's reference column,
    tool_call's tools, the names a user reward requires; a user reward gets every column through **kwargs),
    and the columns every row must have -> the reward that needs it (a row's tools are optional).
    ``recorded``: what a run's data report recorded, read instead of importing the user rewards."""
    from qlora_pipe.rewards.user_rewards import reward_columns as required

    needs = dict(required(recipe.grpo.rewards, recorded))  # imports user rewards to read their signatures
    reads = {r.label(): list(needs[r.label()]) for r in recipe.grpo.rewards}
    for r in recipe.grpo.rewards:
        reads[r.label()] += ["tools"] if r.function == "tool_call" else []
    return reads, {column: label for label, columns in needs.items() for column in columns}


def prepare_prompt_data(
    recipe, tokenizer, train_name: str = "train", recorded: dict[str, list[str]] | None = None
) -> PreparedData:
    """Read, check, split and report prompt rows (no cache: TRL renders them at train start). ``train_name``:
    what the first split is called (eval --data reads its file as that split). ``recorded``: the columns each
    reward reads as a finished run recorded them (recorded_reward_columns), so that no reward code is needed."""
    from qlora_pipe.data.chat_templates import require_chat_template

    data = recipe.data
    require_chat_template(tokenizer, getattr(tokenizer, "name_or_path", "the model"))
    reads, needed = reward_columns(recipe, recorded)
    rng = random.Random(recipe.seed)
    train_report, eval_report = SplitReport(train_name), SplitReport("eval")

    def convert(row: dict[str, Any]) -> dict[str, Any] | str:
        return to_prompt_row(row, needed)

    train = collect(data.train_sources(), data, rng, train_report, convert)[: data.max_train_samples]
    held_out = collect(data.held_out_sources(), data, rng, eval_report, convert) if data.held_out_sources() else []
    train, held_out = hold_out(train, held_out, data, rng, eval_report)
    check_tools_render(train + held_out, tokenizer, data)
    train_ds = check_split(train, tokenizer, recipe, train_report)
    if train_ds is None:
        raise UserError(f"{train_report.what()}: no usable prompt rows ({train_report.line()})")
    eval_ds = check_split(held_out, tokenizer, recipe, eval_report) if held_out else None
    require_eval_rows(data, len(eval_ds or ()), eval_report, "prompts")
    reports = [train_report] + ([eval_report] if eval_ds is not None else [])
    for report in reports:
        report.reward_columns = reads
    first = train_ds[0]["prompt"]
    system = first[0]["content"] if first[0]["role"] == "system" else None
    for report in reports:
        if is_main_process():
            log.info("data: %s", report.line())
    parts = [data.model_dump_json(), recipe.grpo.model_dump_json(), str(tokenizer.chat_template), str(recipe.seed)]
    digest = hashlib.sha256(json.dumps([parts, train, held_out], sort_keys=True).encode()).hexdigest()[:24]
    # TRL would score held-out prompts by sampling num_generations each; the held-out rewards are greedy
    # answers scored by this pipeline (training/grpo_scores.py), so TRL gets no eval split.
    return PreparedData(train_ds, None, reports, system, digest, held_out_prompts=eval_ds)


def recorded_reward_columns(report_path: Path) -> dict[str, list[str]] | None:
    """Label -> the columns each reward reads, as a run's data_report.json recorded them (None: not recorded)."""
    if not report_path.is_file():
        return None
    reports = json.loads(report_path.read_text())
    return next((r["reward_columns"] for r in reports if r.get("prompt_rows") and "reward_columns" in r), None)


def prompt_preview_text(prepared: PreparedData, tokenizer, recipe, count: int) -> str:
    """Each prompt as the model sees it (chat template and generation prompt), and what each reward reads."""
    lines = ["data report:", *[f"  {report.line()}" for report in prepared.reports]]
    shown = min(count, len(prepared.train))
    lines.append(f"\n{shown} prompt(s) as rendered; the model writes the answer, the rewards score it:")
    for index in range(shown):
        row = prepared.train[index]
        rendered = render_prompt(row, tokenizer, tokenize=False)
        lines.append(f"\n--- prompt {index + 1} ---\n{rendered}")
        for reward in recipe.grpo.rewards:
            lines.append(f"  reward {reward.label()} (x{reward.weight:g}): {reward_reads(reward, row)}")
    return "\n".join(lines)


def reward_reads(reward, row: dict[str, Any]) -> str:
    f = reward.function
    if f in ("exact_match", "token_f1"):
        part = f"the first group of {reward.pattern!r}" if reward.pattern else "the whole answer"
        return f"{f} of {part} against {reward.reference_column()} = {row.get(reward.reference_column())!r}"
    if f == "regex":
        return f"1 if the answer matches {reward.pattern!r}, else 0"
    if f == "json":
        return "1 if the answer is valid JSON, else 0"
    if f == "tool_call":
        return f"1 if the answer is a valid call of the row's tools ({'listed' if row.get('tools') else 'none listed'})"
    if f == "length":
        return f"minus (completion tokens - {reward.max_tokens}) / {reward.max_tokens} above {reward.max_tokens}"
    columns = {k: v for k, v in row.items() if k != "prompt"}
    shown = ", ".join(f"{k}={v!r:.40}" for k, v in columns.items()) or "no other columns"
    return f"{f}(prompts, completions, completion_ids, {shown}, ...)"


def prompt_rows(rows, tokenizer) -> list[dict[str, list[int]]]:
    """Each prompt as rendered for generation, every token scored: what the export's fidelity check compares
    between the trained and the merged model (a GRPO row has no reference answer to score)."""
    out = []
    for row in rows:
        ids = render_prompt(row, tokenizer)
        out.append({"input_ids": ids, "labels": list(ids)})
    return out
