"""One conversation checked and normalized: roles, tool calls, tool results and reasoning.

A kept conversation is ``{"messages": [...]}`` (plus ``"tools"`` when the row lists functions) in
the shape chat templates read: assistant turns may carry ``tool_calls`` (each
``{"type": "function", "function": {"name", "arguments": {...}}}``) and ``reasoning_content``;
``tool`` turns carry a result. Anything else is the reason the row is dropped, counted by
data/prepare.py. Reasoning is read from ``reasoning_content``, ``reasoning`` or ``thinking``, or
from a ``<think>...</think>`` block that opens the content; what is done with it (train, mask,
drop) is decided later, by data.reasoning.
"""

from __future__ import annotations

import json
import re
from typing import Any

ROLES = {"system", "user", "assistant", "tool"}
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
THINK_BLOCK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)


def check_conversation(messages: Any, tools: Any = None) -> dict[str, Any] | str:
    """The normalized conversation, or the reason the row is unusable."""
    if not isinstance(messages, list) or not messages:
        return "missing or non-string field"
    functions = check_tools(tools)
    if isinstance(functions, str):
        return functions
    names = {tool["function"]["name"] for tool in functions} if functions is not None else None
    clean: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    calls_so_far = 0
    for message in messages:
        if not isinstance(message, dict):
            return "missing or non-string field"
        role = message.get("role")
        if role not in ROLES:
            return "unknown role"
        content = message.get("content")
        if content is None and (role == "tool" or (role == "assistant" and message.get("tool_calls"))):
            content = ""  # an assistant turn that only calls tools; a tool that returned nothing
        if not isinstance(content, str):
            return "missing or non-string field"
        if role == "assistant":
            turn = _assistant_turn(message, content, names)
            if isinstance(turn, str):
                return turn
            calls_so_far += len(turn.get("tool_calls", []))
            call_ids.update(c["id"] for c in turn.get("tool_calls", []) if "id" in c)
            clean.append(turn)
        elif role == "tool":
            turn = _tool_turn(message, content, calls_so_far, call_ids)
            if isinstance(turn, str):
                return turn
            clean.append(turn)
        else:
            if not content.strip():
                return "empty message"
            clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        return "no assistant turn"
    return {"messages": clean, "tools": functions} if functions is not None else {"messages": clean}


def check_tools(tools: Any) -> list[dict[str, Any]] | str | None:
    """The row's functions as ``{"type": "function", "function": {...}}``; None when the row lists none."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):  # many Hub datasets store the list as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            return "tools list is not valid JSON"
    if not isinstance(tools, list):
        return "tools is not a list of functions"
    functions = []
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            return "tools list has an entry without a function name"
        functions.append({"type": "function", "function": function})
    return functions


def _assistant_turn(message: dict[str, Any], content: str, names: set[str] | None) -> dict[str, Any] | str:
    reasoning = next((message[f] for f in REASONING_FIELDS if isinstance(message.get(f), str)), None)
    if reasoning is None:
        block = THINK_BLOCK.match(content)
        if block:
            reasoning, content = block.group(1), content[block.end() :]
    turn: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None and reasoning.strip():
        turn["reasoning_content"] = reasoning.strip()
    raw_calls = message.get("tool_calls")
    if raw_calls:
        if not isinstance(raw_calls, list):
            return "tool_calls is not a list"
        calls = []
        for raw in raw_calls:
            call = _tool_call(raw, names)
            if isinstance(call, str):
                return call
            calls.append(call)
        turn["tool_calls"] = calls
    elif not content.strip():
        return "empty message"
    return turn


def _tool_call(raw: Any, names: set[str] | None) -> dict[str, Any] | str:
    function = raw.get("function", raw) if isinstance(raw, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return "tool call without a function name"
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return "tool call arguments are not valid JSON"
    if not isinstance(arguments, dict):
        return "tool call arguments are not a JSON object"
    if names is None:
        return "tool call in a row with no tools list"
    if function["name"] not in names:
        return "tool call names a function not in the row's tools"
    call: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(raw.get("id"), str):
        call["id"] = raw["id"]
    return call


def _tool_turn(message: dict[str, Any], content: str, calls_so_far: int, call_ids: set[str]) -> dict[str, Any] | str:
    if calls_so_far == 0:
        return "tool result before any tool call"
    turn: dict[str, Any] = {"role": "tool", "content": content}
    call_id = message.get("tool_call_id")
    if isinstance(call_id, str):
        if call_ids and call_id not in call_ids:
            return "tool result's tool_call_id matches no tool call"
        turn["tool_call_id"] = call_id
    if isinstance(message.get("name"), str):
        turn["name"] = message["name"]
    return turn


def has_tools(example: dict[str, Any]) -> bool:
    return "tools" in example or any(m["role"] == "tool" or "tool_calls" in m for m in example.get("messages", []))
