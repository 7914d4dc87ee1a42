"""Tool calls read back from an answer's text, and scored against the reference answer's calls.

The formats the supported templates write: ``<tool_call>{"name", "arguments"}</tool_call>`` blocks
(Hermes, Qwen2.5, Qwen3, the built-in chatml), a bare JSON object ``{"name", "parameters"}`` (Llama 3.1,
the built-in llama-3), and a JSON list of calls (Mistral's ``[TOOL_CALLS]``). A ``<think>`` block is set
aside first. Calls are parsed, never executed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
THINKING = re.compile(r"^\s*(?:<think>)?.*?</think>\s*", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str | None  # None: the model opened a call that is not valid JSON
    arguments: Any = None

    def show(self) -> str:
        if self.name is None:
            return "(a tool call that is not valid JSON)"
        return f"{self.name}({json.dumps(self.arguments, ensure_ascii=False)})"


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every tool call in an answer, in order; [] for an answer that calls nothing."""
    text = THINKING.sub("", text, count=1) if "</think>" in text else text
    blocks = BLOCK.findall(text)
    if blocks:
        return [_call(_json(block)) for block in blocks]
    stripped = text.strip().removeprefix("[TOOL_CALLS]").strip()
    if not stripped.startswith(("{", "[")):
        return []
    value = _json(stripped)
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        return [_call(v) for v in value]
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return [_call(value)]
    return []


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _call(value: Any) -> ToolCall:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return ToolCall(None)
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some formats nest the arguments as a JSON string
        arguments = _json(arguments) if arguments.strip() else {}
    return ToolCall(value["name"], arguments)


def score_tool_calls(predictions: list[str], references: list[str]) -> dict[str, float | int]:
    """On the answers whose reference calls tools: the share that call the same functions in the same
    order (function-name accuracy), and the share whose calls also have exactly the same arguments.
    Empty when no reference calls a tool."""
    pairs = [(parse_tool_calls(p), parse_tool_calls(r)) for p, r in zip(predictions, references, strict=True)]
    pairs = [(got, want) for got, want in pairs if want]
    if not pairs:
        return {}
    names = sum([c.name for c in got] == [c.name for c in want] for got, want in pairs)
    exact = sum(got == want for got, want in pairs)
    return {
        "tool_rows": len(pairs),
        "tool_name_accuracy": names / len(pairs),
        "tool_arguments_exact": exact / len(pairs),
    }
