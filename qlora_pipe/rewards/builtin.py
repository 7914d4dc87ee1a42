"""The built-in rewards of method: grpo: exact match and token F1 against a reference column, a regex the
answer must match, valid JSON, a valid tool call against the row's tools, and a length penalty.

Each built-in is made from its recipe entry and called like a TRL reward function: the completions (text,
or one assistant message each), their token ids, and the rows' columns as lists. Pure Python: the
evaluation stage scores greedy answers with the same functions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from qlora_pipe.recipe.grpo import RewardSection
from qlora_pipe.rewards.answer_match import exact_match, token_f1
from qlora_pipe.rewards.tool_calls import parse_tool_calls

Reward = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """A completion as TRL hands it over: a string, or a list of messages (the assistant's turn). Calls that
    TRL parsed out of the text (a tokenizer with a response schema) come back as <tool_call> blocks."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(_message_text(m) for m in completion if isinstance(m, dict))
    return str(completion)


def _message_text(message: dict) -> str:
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        calls.append({"name": function.get("name"), "arguments": function.get("arguments")})
    return str(message.get("content") or "") + "".join(f"<tool_call>{json.dumps(c)}</tool_call>" for c in calls)


def _answer(text: str, pattern: re.Pattern | None) -> str | None:
    """The part of the answer that is compared: the pattern's first group (the whole match without groups);
    None when the pattern does not match."""
    if pattern is None:
        return text.strip()
    found = pattern.search(text)
    if found is None:
        return None
    return found.group(1) if pattern.groups else found.group(0)


def _against_reference(spec: RewardSection, score: Callable[[str, str], float]) -> Reward:
    column = spec.reference_column()
    pattern = re.compile(spec.pattern) if spec.pattern else None

    def reward(completions, **columns) -> list[float]:
        if column not in columns:
            raise KeyError(f"the rows have no column {column!r} (reward {spec.label()} compares against it)")
        answers = [_answer(completion_text(c), pattern) for c in completions]
        return [0.0 if a is None else score(a, str(ref)) for a, ref in zip(answers, columns[column], strict=True)]

    return reward


def _regex(spec: RewardSection) -> Reward:
    pattern = re.compile(spec.pattern or "", re.DOTALL)

    def reward(completions, **_) -> list[float]:
        return [float(pattern.fullmatch(completion_text(c).strip()) is not None) for c in completions]

    return reward


def _is_json(text: str) -> bool:
    text = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)  # a fenced block counts as its body
    try:
        json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError:
        return False
    return True


def _json(spec: RewardSection) -> Reward:
    def reward(completions, **_) -> list[float]:
        return [float(_is_json(completion_text(c))) for c in completions]

    return reward


def _functions(tools: Any) -> dict[str, dict] | None:
    """The row's tools as {name: JSON-schema parameters}; None when the row lists none (any name is valid)."""
    if isinstance(tools, str):
        tools = json.loads(tools) if tools.strip() else None
    if not tools:
        return None
    found = {}
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(function.get("name"), str):
            found[function["name"]] = function.get("parameters") or {}
    return found


def valid_tool_call(text: str, tools: Any) -> bool:
    """At least one call, each valid JSON naming one of the row's functions with its required arguments."""
    calls = parse_tool_calls(text)
    functions = _functions(tools)
    if not calls:
        return False
    for call in calls:
        if call.name is None or not isinstance(call.arguments, dict):
            return False
        if functions is not None:
            if call.name not in functions:
                return False
            required = functions[call.name].get("required", [])
            if any(name not in call.arguments for name in required):
                return False
    return True


def _tool_call(spec: RewardSection) -> Reward:
    def reward(completions, tools=None, **_) -> list[float]:
        rows = tools if tools is not None else [None] * len(completions)
        return [float(valid_tool_call(completion_text(c), t)) for c, t in zip(completions, rows, strict=True)]

    return reward


def _length(spec: RewardSection) -> Reward:
    limit = spec.max_tokens or 1

    def reward(completions, completion_ids, **_) -> list[float]:
        return [-max(0, len(ids) - limit) / limit for ids in completion_ids]

    return reward


BUILDERS: dict[str, Callable[[RewardSection], Reward]] = {
    "exact_match": lambda spec: _against_reference(spec, exact_match),
    "token_f1": lambda spec: _against_reference(spec, token_f1),
    "regex": _regex,
    "json": _json,
    "tool_call": _tool_call,
    "length": _length,
}


def builtin_reward(spec: RewardSection) -> Reward:
    return BUILDERS[spec.function](spec)
