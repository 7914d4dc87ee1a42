"""Tool rows checked: what the data stage reads (ShareGPT function calls, arguments per row), what it drops
and counts by reason, and the templates it refuses for tools or reasoning, in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_pipe.data.chat_templates import select_chat_template
from qlora_pipe.errors import UserError
from tests.helpers.tool_data import CALL, RESULT, THINK_ROW, THOUGHT, TOOL_ROW, TOOLS, prepare, split, with_family


def test_tool_arguments_keep_their_own_keys_across_rows(tokenizer, tmp_path):
    """Rows whose calls have different argument names stay apart (no merged schema adds null arguments)."""
    tokenizer = with_family(tokenizer, "chatml")
    other = json.loads(json.dumps(TOOL_ROW))
    other["messages"][1]["tool_calls"] = [{"function": {"name": "find_statute", "arguments": '{"topic": "service"}'}}]
    prepared = prepare(tmp_path, tokenizer, [TOOL_ROW, other])
    texts = [split(prepared, tokenizer, i)[1] for i in range(2)]
    assert '{"name": "find_statute", "arguments": {"topic": "service"}}' in "".join(texts)
    assert "null" not in "".join(texts)


def test_bad_tool_rows_are_dropped_and_counted_by_reason(tokenizer, tmp_path):
    tokenizer = with_family(tokenizer, "chatml")

    def with_call(function: dict, tools=TOOLS) -> dict:
        row = json.loads(json.dumps(TOOL_ROW))
        row["messages"][1]["tool_calls"] = [{"type": "function", "function": function}]
        row["tools"] = tools
        return row

    bad = [
        with_call({"name": "delete_records", "arguments": {}}),
        with_call({"name": "find_statute", "arguments": '{"topic": "service"'}),
        with_call({"name": "find_statute", "arguments": "[1, 2]"}),
        with_call({"name": "find_statute", "arguments": {}}, tools=None),
        with_call({"arguments": {}}),
        {**TOOL_ROW, "tools": "[{not json"},
        {
            "tools": TOOLS,
            "messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}, TOOL_ROW["messages"][3]],
        },
    ]
    prepared = prepare(tmp_path, tokenizer, [TOOL_ROW, *bad])
    assert prepared.reports[0].dropped == {
        "tool call names a function not in the row's tools": 1,
        "tool call arguments are not valid JSON": 1,
        "tool call arguments are not a JSON object": 1,
        "tool call in a row with no tools list": 1,
        "tool call without a function name": 1,
        "tools list is not valid JSON": 1,
        "tool result before any tool call": 1,
    }
    assert len(prepared.train) == 1
    with pytest.raises(UserError, match=r"row 2: tool call names a function not in the row's tools"):
        prepare(tmp_path / "strict", tokenizer, [TOOL_ROW, *bad], on_bad_row="error")


def test_sharegpt_function_call_and_observation_turns(tokenizer, tmp_path):
    tokenizer = with_family(tokenizer, "chatml")
    row = {
        "tools": json.dumps(TOOLS),
        "conversations": [
            {"from": "human", "value": "When is my reply due?"},
            {"from": "function_call", "value": json.dumps({"name": "compute_deadline", "arguments": {"days": 30}})},
            {"from": "observation", "value": RESULT},
            {"from": "gpt", "value": "On 1 April."},
        ],
    }
    _, trained, masked = split(prepare(tmp_path, tokenizer, [row]), tokenizer)
    assert '{"name": "compute_deadline", "arguments": {"days": 30}}' in trained and RESULT in masked


def test_a_row_the_template_itself_refuses_is_dropped_with_its_message(tokenizer, tmp_path):
    """Llama 3.1's template raises on two calls in one turn: that row is dropped and counted, the rest train."""
    tokenizer = with_family(tokenizer, "llama-3.1")
    two_calls = json.loads(json.dumps(TOOL_ROW))
    two_calls["messages"][1]["tool_calls"] = [CALL, CALL]
    prepared = prepare(tmp_path, tokenizer, [TOOL_ROW, two_calls])
    assert prepared.reports[0].dropped == {
        "the chat template refuses the row: This model only supports single tool-calls at once!": 1
    }
    assert len(prepared.train) == 1


def test_a_template_without_tool_support_is_refused(tokenizer, tmp_path):
    select_chat_template(tokenizer, "plain")
    with pytest.raises(UserError, match=r"1 rows have tools or tool calls, but the chat template does not render"):
        prepare(tmp_path, tokenizer, [TOOL_ROW])


def test_a_template_that_drops_the_tools_list_is_refused(tokenizer, tmp_path):
    """Calls and results rendered, the functions never shown: the model would learn calls it cannot see offered."""
    chatml = (Path(__file__).parents[1] / "qlora_pipe/data/template_files/chatml.jinja").read_text()
    start, end = chatml.index("{%- if tools -%}"), chatml.index("{%- for message in messages -%}")
    template = tmp_path / "no-tools-list.jinja"
    template.write_text(chatml[:start] + chatml[end:])
    select_chat_template(tokenizer, str(template))
    with pytest.raises(UserError, match=r"1 rows have tools or tool calls, but the chat template does not render"):
        prepare(tmp_path, tokenizer, [TOOL_ROW])


def test_a_template_that_ignores_reasoning_is_refused_unless_dropped(tokenizer, tmp_path):
    tokenizer = with_family(tokenizer, "qwen2.5")
    with pytest.raises(UserError, match=r"^data.reasoning: train: 1 rows have reasoning, but the chat template"):
        prepare(tmp_path, tokenizer, [THINK_ROW])
    whole, _, _ = split(prepare(tmp_path, tokenizer, [THINK_ROW], reasoning="drop"), tokenizer)
    assert THOUGHT not in whole
