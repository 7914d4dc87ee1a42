"""Data sources: read rows from local files or the Hub, and turn every format into one shape.

Every row becomes either a conversation ``{"messages": [{role, content}, ...]}`` or a document
``{"text": ...}``, or a reason why it cannot (counted and reported by data/prepare.py). Formats are
declared per source or detected from the columns, with a printed notice.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import random
from pathlib import Path
from typing import Any

from qlora_pipe.data.conversation import check_conversation
from qlora_pipe.errors import UserError
from qlora_pipe.recipe import SourceSection

log = logging.getLogger(__name__)

SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",  # a tool call, its value a JSON {"name", "arguments"}
    "observation": "tool",  # a tool's result
}
# Format -> the columns that identify it, in detection order.
SIGNATURES = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


def resolve_files(pattern: str) -> list[Path]:
    """A file, every data file in a directory, or a glob; resolved to absolute paths."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    elif any(ch in pattern for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).suffix in SUFFIXES)
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise UserError(f"data file not found: {pattern}")
    unsupported = [f for f in files if f.suffix not in SUFFIXES]
    if unsupported:
        raise UserError(f"{unsupported[0]}: unsupported file type (use {', '.join(SUFFIXES)})")
    return [f.resolve() for f in files]


def read_text(path: Path) -> str:
    """A text file as UTF-8; anything else is an error naming the file and the line of the first bad byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from exc


def read_file(path: Path) -> list[dict[str, Any]]:
    """The rows of one file; a file that cannot be read is one error naming it, never a traceback."""
    try:
        return read_json_lines(path) if SUFFIXES[path.suffix] == "json" else read_table(path)
    except UserError:
        raise
    except csv.Error as exc:
        raise UserError(f"{path}: invalid CSV: {exc}") from exc
    except Exception as exc:  # pyarrow/datasets raise many types for a corrupt or truncated Parquet file
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"{path}: cannot read this {path.suffix} file ({type(exc).__name__}: {reason})") from exc


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """JSONL (or a JSON array); a malformed line is an error naming file and line."""
    text = read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
        return [r if isinstance(r, dict) else {"_invalid": r} for r in rows]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: invalid JSON: {exc.msg}") from exc
        rows.append(row if isinstance(row, dict) else {"_invalid": row})
    return rows


def read_table(path: Path) -> list[dict[str, Any]]:
    """CSV as text (no type guessing: an answer "42" stays a string); Parquet with its own types."""
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    from datasets import load_dataset

    return load_dataset("parquet", data_files=str(path), split="train").to_list()


def read_source(source: SourceSection) -> list[dict[str, Any]]:
    """All raw rows of one source, in file order."""
    if source.hub is not None:
        return read_hub(source)
    rows: list[dict[str, Any]] = []
    files = resolve_files(source.path)
    for path in files:
        rows.extend(read_file(path))
    shown = str(files[0]) if len(files) == 1 else f"{len(files)} files under {files[0].parent}"
    log.info("data: %s -> %s: %d rows", source.path, shown, len(rows))
    return rows


def read_hub(source: SourceSection) -> list[dict[str, Any]]:
    """A Hub dataset (or a local dataset folder) through datasets.load_dataset.

    datasets >= 4 runs no dataset loading scripts at all, so no remote code can execute here.
    """
    from datasets import load_dataset

    try:
        dataset = load_dataset(source.hub, name=source.config, split=source.split, revision=source.revision)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError)
        raise UserError(f"data source {source.label()}: cannot load: {exc}") from exc
    log.info("data: %s -> %d rows", source.label(), len(dataset))
    return dataset.to_list()


def detect_format(rows: list[dict[str, Any]], label: str) -> str:
    columns = set().union(*(r.keys() for r in rows[:100])) if rows else set()
    for fmt, needed in SIGNATURES.items():
        if all(c in columns for c in needed):
            log.info("data: %s: detected format '%s' (columns: %s)", label, fmt, ", ".join(sorted(columns)))
            return fmt
    raise UserError(
        f"data source {label}: cannot detect the format from columns {sorted(columns)}; "
        "set format (and columns) for this source"
    )


def to_example(row: dict[str, Any], fmt: str) -> dict[str, Any] | str:
    """One normalized example, or the reason the row is unusable."""
    if fmt == "text":
        text = row.get("text")
        if not isinstance(text, str):
            return "missing or non-string field"
        return {"text": text} if text.strip() else "empty row"
    if fmt == "messages":
        messages = row.get("messages")
        if not isinstance(messages, list):
            return "missing or non-string field"
    elif fmt == "sharegpt":
        messages = _from_sharegpt(row.get("conversations"))
    elif fmt == "alpaca":
        messages = _from_alpaca(row)
    else:
        messages = _from_prompt_completion(row)
    if isinstance(messages, str):
        return messages
    return check_conversation(messages, row.get("tools"))


def _from_sharegpt(turns: Any) -> list[dict[str, Any]] | str:
    if not isinstance(turns, list):
        return "missing or non-string field"
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return "missing or non-string field"
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            return "unknown role"
        if turn.get("from") == "function_call":
            messages.append({"role": role, "content": "", "tool_calls": [_sharegpt_call(turn.get("value"))]})
        else:
            messages.append({"role": role, "content": turn.get("value")})
    return messages


def _sharegpt_call(value: Any) -> Any:
    """A ShareGPT function_call turn's JSON value as a tool call (checked with the rest of the row)."""
    try:
        return json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return {"name": None}


def _from_alpaca(row: dict[str, Any]) -> list[dict[str, Any]] | str:
    instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
    if not all(isinstance(v, str) for v in (instruction, extra, output)):
        return "missing or non-string field"
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _from_prompt_completion(row: dict[str, Any]) -> list[dict[str, Any]] | str:
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        return "missing or non-string field"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def rename_columns(rows: list[dict[str, Any]], columns: dict[str, str]) -> list[dict[str, Any]]:
    """Apply the recipe's ``columns`` mapping (format name -> the dataset's column name)."""
    if not columns:
        return rows
    return [{**row, **{ours: row.get(theirs) for ours, theirs in columns.items()}} for row in rows]


def draw(rows: list[Any], source: SourceSection, rng: random.Random) -> list[Any]:
    """Apply a source's weight or sample count: whole copies first, then a seeded sample of the rest."""
    target = source.samples if source.samples is not None else round(len(rows) * source.weight)
    copies, rest = divmod(target, len(rows)) if rows else (0, 0)
    return rows * copies + rng.sample(rows, rest)
