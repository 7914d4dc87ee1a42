"""Rows -> validated, templated, tokenized, masked SFT dataset (+ report).

Gets a tokenizer; never loads a model. Every row is checked and kept or counted under the reason it was
dropped. Conversations are rendered with the chat template and masked ({% generation %} markers or located
turns), the end-of-turn token always trained. The trainer receives ``input_ids`` and ``labels`` (-100 where
no loss) ready made: what ``qlora-pipe data --preview`` shows is what training sees.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Callable
from typing import Any

from qlora_pipe.data.cache import data_fingerprint, load_cached, save_cached
from qlora_pipe.data.chat_masks import TurnNotFound, check_template_for, encode_conversation, probe_template
from qlora_pipe.data.chat_templates import require_chat_template
from qlora_pipe.data.prepared import IGNORE, PreparedData
from qlora_pipe.data.report import SplitReport, require_eval_rows
from qlora_pipe.data.sources import detect_format, draw, read_source, rename_columns, to_example
from qlora_pipe.data.template_errors import refuse_failing_template, row_drop_reason
from qlora_pipe.data.tokens import ensure_distinct_pad
from qlora_pipe.data.turn_spans import TurnFormat, probe_turns
from qlora_pipe.errors import UserError
from qlora_pipe.machine.dist import is_main_process
from qlora_pipe.recipe import DataSection, SourceSection

log = logging.getLogger(__name__)

PREVIEW_MARKS = 20  # rows whose tool/reasoning marks are kept for `qlora-pipe data --preview`


def masking_plan(tokenizer) -> tuple[str, TurnFormat | None]:
    """How assistant turns are found: {% generation %} markers (the template's own, or a training copy of a
    known family) first; else the template as it is, its turns located by offsets (data/turn_spans.py)."""
    from qlora_pipe.compat.trl import training_template

    refuse_failing_template(tokenizer, tokenizer.chat_template)  # TRL's helpers render it without a word of why
    try:
        training_template(tokenizer, tokenizer.chat_template)
    except ValueError:
        turns = probe_turns(tokenizer, tokenizer.chat_template)
        adopt_end_of_turn(tokenizer, turns.end_of_turn)
        return tokenizer.chat_template, turns
    return training_chat_template(tokenizer), None


def adopt_end_of_turn(tokenizer, end_of_turn: str) -> None:
    """The token that closes an assistant turn is what the model learns to emit: make it the EOS, so that
    generation (chat, eval, serving configs) stops there, as the built-in templates do."""
    if tokenizer.eos_token == end_of_turn:
        return
    log.info("data: the chat template ends assistant turns with %s; it becomes the EOS token", end_of_turn)
    tokenizer.eos_token = end_of_turn
    ensure_distinct_pad(tokenizer)


def masking_method(turns: TurnFormat | None) -> str:
    """The report's words for how the loss mask was found."""
    if turns is None:
        return "{% generation %} markers"
    return f"assistant turns located by offsets (closed by {turns.end_of_turn})"


def training_chat_template(tokenizer) -> str:
    """The template to mask with: the tokenizer's own if it has {% generation %} markers, else TRL's
    training variant of a known family. Refuses templates that would not train the end-of-turn token."""
    from qlora_pipe.compat.trl import stop_token_trained, training_template

    try:
        template = training_template(tokenizer, tokenizer.chat_template)
    except ValueError as exc:
        raise UserError(
            "data.loss_on: the chat template has no {% generation %} markers and is not a family TRL "
            "knows; add the markers, choose data.chat_template, or set data.loss_on: all"
        ) from exc
    refuse_failing_template(tokenizer, template)  # TRL's check below swallows the template's errors
    if not stop_token_trained(tokenizer, template):
        raise UserError(
            "data.loss_on: the chat template leaves the end-of-turn token outside the loss mask, so the "
            "model would never learn to stop; put it inside {% generation %}...{% endgeneration %}"
        )
    return template


def collect(
    sources: list[SourceSection],
    data: DataSection,
    rng: random.Random,
    report: SplitReport,
    convert: Callable[[dict[str, Any]], Any] | None = None,
    source_convert: Callable[[dict[str, Any], SourceSection], Any] | None = None,
) -> list:
    """Rows of several sources read, checked, mixed (``convert``, ``source_convert``: a row -> example or why not)."""
    examples: list[dict[str, Any]] = []
    seen: set[str] = set()  # rows already read, across sources: repeats are counted (and dropped with dedupe)
    for source in sources:
        rows = rename_columns(read_source(source), source.columns)
        if source_convert is not None:
            convert = functools.partial(source_convert, source=source)
        elif convert is None:
            fmt = source.format if source.format != "auto" else detect_format(rows, source.label())
        kept = []
        for index, row in enumerate(rows):
            example = convert(row) if convert is not None else to_example(row, fmt)
            if isinstance(example, str):
                if data.on_bad_row == "error":
                    raise UserError(f"{source.label()}: row {index + 1}: {example}")
                report.dropped[example] += 1
                continue
            key = example_key(example)
            if key in seen:
                report.duplicate_rows += 1
                if data.dedupe:
                    report.dropped["duplicate row"] += 1
                    continue
            seen.add(key)
            kept.append(example)
        report.rows_read += len(rows)
        examples.extend(draw(kept, source, rng))
    return examples


def hold_out(train: list, held_out: list, data: DataSection, rng: random.Random, report: SplitReport):
    """The eval split: data.eval_fraction of the shuffled training rows (else the held-out sources'), capped."""
    if data.eval_fraction > 0:
        rng.shuffle(train)
        cut = max(1, round(len(train) * data.eval_fraction))
        held_out, train = train[:cut], train[cut:]
        report.rows_read = len(held_out)
    return train, held_out[: data.max_eval_samples]


def collected_splits(data: DataSection, rng: random.Random, train_report, eval_report, **convert) -> tuple[list, list]:
    """Training and held-out examples (``convert``: collect's); training rows repeating held-out ones dropped."""
    train = collect(data.train_sources(), data, rng, train_report, **convert)[: data.max_train_samples]
    held_out = collect(data.held_out_sources(), data, rng, eval_report, **convert) if data.held_out_sources() else []
    train, held_out = hold_out(train, held_out, data, rng, eval_report)
    eval_keys = {example_key(e) for e in held_out}
    before = len(train)
    train = [e for e in train if example_key(e) not in eval_keys]
    if before - len(train):
        train_report.dropped["duplicate of an eval row"] += before - len(train)
    return train, held_out


def example_key(example: dict[str, Any]) -> str:
    return json.dumps(example, sort_keys=True)


def encode(
    example: dict[str, Any],
    tokenizer,
    template: str | None,
    data: DataSection,
    empty_think: bool = False,
    turns: TurnFormat | None = None,
) -> dict[str, Any]:
    """input_ids and labels of one example, with its length, a drop reason ('' when kept), its tool and
    reasoning counts and its preview marks (JSON)."""
    counts: dict[str, int] = {}
    marks: list = []
    if example.get("messages"):
        conversation = {"messages": json.loads(example["messages"])}
        if example.get("tools"):
            conversation["tools"] = json.loads(example["tools"])
        try:
            encoded = encode_conversation(conversation, tokenizer, template, data, empty_think, turns)
        except TurnNotFound as exc:
            return dropped(f"assistant turn not located ({exc})")
        except Exception as exc:  # the template's raise_exception (one tool call per turn only, ...) or its bug
            reason = row_drop_reason(exc)
            if reason is None:  # not the template's
                raise
            return dropped(reason)
        ids, mask, counts, marks = encoded.input_ids, encoded.mask, encoded.counts, encoded.marks
    else:
        ids = tokenizer(example["text"])["input_ids"] + [tokenizer.eos_token_id]
        mask = [1] * len(ids)
    reason, truncated = "", False
    if len(ids) > data.max_length:
        if data.overlength == "truncate":
            ids, mask, truncated = ids[: data.max_length], mask[: data.max_length], True
            marks = [m for m in marks if m[0] < data.max_length]
        else:
            reason = f"longer than max_length {data.max_length}"
    if not reason and not any(mask):
        reason = "no trained tokens"
    labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    return {
        "input_ids": ids,
        "labels": labels,
        "n_tokens": len(ids),
        "n_trained": sum(mask),
        "reason": reason,
        "truncated": truncated,
        "counts": json.dumps(counts),
        "marks": json.dumps(marks),
    }


def tokenize_split(
    examples: list[dict],
    tokenizer,
    template: str | None,
    data: DataSection,
    report: SplitReport,
    empty_think: bool,
    turns: TurnFormat | None = None,
):
    from datasets import Dataset

    # Every row carries every key, so conversation and text sources can be mixed in one table. Conversations
    # travel as JSON: Arrow would merge the varying keys of tool-call arguments across rows into one schema.
    dataset = Dataset.from_list([table_row(e) for e in examples])
    dataset = dataset.map(
        encode,
        fn_kwargs={
            "tokenizer": tokenizer,
            "template": template,
            "data": data,
            "empty_think": empty_think,
            "turns": turns,
        },
        remove_columns=dataset.column_names,
        num_proc=data.num_proc,
        desc=f"Tokenizing {report.name}",
    )
    reasons = dataset["reason"]
    if data.overlength == "error":
        too_long = [i for i, r in enumerate(reasons) if r.startswith("longer")]
        if too_long:
            raise UserError(
                f"{report.name}: {len(too_long)} rows exceed data.max_length {data.max_length} "
                f"(first: row {too_long[0] + 1}); set data.overlength: drop or truncate"
            )
    for reason in reasons:
        if reason:
            report.dropped[reason] += 1
    keep = [i for i, r in enumerate(reasons) if not r]
    dataset = dataset.select(keep)
    report.add_lengths(dataset["n_tokens"], dataset["n_trained"])
    report.truncated = sum(dataset["truncated"])
    report.add_counts([json.loads(c) for c in dataset["counts"]])
    report.marks = [json.loads(m) for m in dataset.select(range(min(PREVIEW_MARKS, len(dataset))))["marks"]]
    return dataset.remove_columns(["n_tokens", "n_trained", "reason", "truncated", "counts", "marks"])


def dropped(reason: str) -> dict[str, Any]:
    """The encoded form of a row the data stage drops with ``reason``."""
    empty = {"input_ids": [], "labels": [], "n_tokens": 0, "n_trained": 0, "truncated": False}
    return {**empty, "reason": reason, "counts": "{}", "marks": "[]"}


def table_row(example: dict[str, Any]) -> dict[str, str | None]:
    messages, tools = example.get("messages"), example.get("tools")
    return {
        "messages": json.dumps(messages) if messages else None,
        "tools": json.dumps(tools) if tools else None,
        "text": example.get("text"),
    }


def prepare_data(data: DataSection, tokenizer, seed: int = 42) -> PreparedData:
    """The data stage: sources read, checked, split, deduplicated, tokenized, masked and reported."""
    fingerprint = data_fingerprint(data, tokenizer, seed)
    cached = load_cached(data, fingerprint)
    if cached is not None:
        for report in cached.reports:
            log.info("data: %s", report.line())
        return cached
    rng = random.Random(seed)
    train_report, eval_report = SplitReport("train"), SplitReport("eval")
    train, held_out = collected_splits(data, rng, train_report, eval_report)
    if not train:
        raise UserError(f"training data: no usable rows after checks ({train_report.line()})")
    template, empty_think, turns = None, False, None
    if any("messages" in e for e in [*train, *held_out]):
        require_chat_template(tokenizer, getattr(tokenizer, "name_or_path", "the model"))
        if data.loss_on != "all":
            template, turns = masking_plan(tokenizer)
            train_report.masking = eval_report.masking = masking_method(turns)
        empty_think = check_template_for(probe_template(tokenizer, template), [*train, *held_out], data)
    train_ds = tokenize_split(train, tokenizer, template, data, train_report, empty_think, turns)
    if len(train_ds) == 0:
        raise UserError(f"training data: no usable rows after tokenization ({train_report.line()})")
    eval_ds = tokenize_split(held_out, tokenizer, template, data, eval_report, empty_think, turns) if held_out else None
    require_eval_rows(data, len(eval_ds or ()), eval_report)
    reports = [train_report] + ([eval_report] if eval_ds is not None else [])
    first = train[0].get("messages") or [{}]
    system = first[0]["content"] if first[0].get("role") == "system" else None
    prepared = PreparedData(train_ds, eval_ds, reports, system, fingerprint)
    for report in reports:
        log.info("data: %s", report.line())
    if is_main_process():  # one writer for the shared cache
        save_cached(data, prepared)
    return prepared
