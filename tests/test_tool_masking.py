"""Tool calls and reasoning traces, token by token, on four template families.

Families: our built-in chatml, llama-3 and mistral, and Qwen2.5, Qwen3 and Llama 3.1 as released (their templates as TRL
stores them to recognize the families), each on the tiny tokenizer. Each case checks which tokens are
trained: the tool call is, the tool result and the tools list are not; reasoning follows data.reasoning;
an empty thinking block is never trained; multi-turn reasoning follows the template's own convention.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_pipe.data.chat_templates import select_chat_template
from qlora_pipe.data.prepare import prepare_data
from qlora_pipe.data.prepared import IGNORE
from qlora_pipe.errors import UserError
from qlora_pipe.recipe import DataSection
from tests.data_helpers import add_llama_3_tokens

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "find_statute",
            "description": "Look up a statute by topic.",
            "parameters": {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "compute_deadline",
            "description": "Add days to a date.",
            "parameters": {"type": "object", "properties": {"start": {"type": "string"}, "days": {"type": "integer"}}},
        },
    },
]
CALL = {"type": "function", "function": {"name": "compute_deadline", "arguments": {"start": "2026-03-02", "days": 30}}}
RESULT = "DEADLINE-2026-04-01"
TOOL_ROW = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "When is my reply due if served on 2026-03-02?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "name": "compute_deadline", "content": RESULT},
        {"role": "assistant", "content": "Your reply is due on 1 April 2026."},
    ],
}
THOUGHT = "The service date starts a thirty day clock."
THINK_ROW = {
    "messages": [
        {"role": "user", "content": "How long do I have to answer?"},
        {"role": "assistant", "content": "Thirty days.", "reasoning_content": THOUGHT},
    ]
}
EARLIER, LATER = "First I recall the rule on service.", "Now I count the days from service."
MULTI_TURN = {
    "messages": [
        {"role": "user", "content": "What starts the clock?"},
        {"role": "assistant", "content": "Service of the complaint.", "reasoning_content": EARLIER},
        {"role": "user", "content": "And how long is it?"},
        {"role": "assistant", "content": "Thirty days.", "reasoning_content": LATER},
    ]
}
FAMILIES = ["chatml", "llama-3", "mistral", "qwen2.5", "qwen3", "llama-3.1"]
END_OF_TURN = {"chatml": "<|im_end|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>"}
END_OF_TURN.update({"llama-3": "<|eot_id|>", "llama-3.1": "<|eot_id|>", "mistral": "</s>"})


def released_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


def with_family(tokenizer, family: str):
    if family.startswith("llama-3"):
        add_llama_3_tokens(tokenizer)
    if family == "mistral":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<s>", "</s>"]})
    if family in ("chatml", "llama-3", "mistral"):
        select_chat_template(tokenizer, family)
        if family == "mistral":
            tokenizer.eos_token, tokenizer.bos_token = "</s>", "<s>"
    else:
        tokenizer.chat_template = released_template(
            {"qwen2.5": "qwen2_5", "qwen3": "qwen3", "llama-3.1": "llama3_1"}[family]
        )
    return tokenizer


def prepare(tmp_path, tokenizer, rows, **data):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    section = DataSection(train_path=str(path), cache_dir=str(tmp_path / "cache"), **data)
    return prepare_data(section, tokenizer)


def split(prepared, tokenizer, index: int = 0) -> tuple[str, str, str]:
    """(whole text, trained text, masked text) of one prepared row; runs joined with a separator."""
    ids, labels = prepared.train["input_ids"][index], prepared.train["labels"][index]
    trained, masked = [], []
    for token, label in zip(ids, labels, strict=True):
        (trained if label != IGNORE else masked).append(token)
    return tokenizer.decode(ids), tokenizer.decode(trained), tokenizer.decode(masked)


@pytest.mark.parametrize("family", FAMILIES)
def test_tool_call_is_trained_and_tool_result_and_tools_list_are_masked(tokenizer, tmp_path, family):
    tokenizer = with_family(tokenizer, family)
    prepared = prepare(tmp_path, tokenizer, [TOOL_ROW])
    _whole, trained, masked = split(prepared, tokenizer)
    assert "compute_deadline" in trained and '"start": "2026-03-02"' in trained and '"days": 30' in trained
    assert "Your reply is due on 1 April 2026." in trained
    assert trained.count(END_OF_TURN[family]) == 2  # the tool-call turn ends, and is trained to end
    assert RESULT in masked and RESULT not in trained
    assert "Look up a statute by topic." in masked and "find_statute" not in trained
    assert "When is my reply due" in masked
    parts = prepared.reports[0].conversation_parts
    assert parts["rows_with_tool_calls"] == 1 and parts["tool_calls_trained"] == 1
    assert parts["tool_results_masked"] == 1 and "tool_results_trained" not in parts
    assert "tools: 1 rows with tool calls, 1 tool calls trained, 1 tool results masked" in prepared.reports[0].line()


@pytest.mark.parametrize("family", ["chatml", "llama-3", "qwen3"])
@pytest.mark.parametrize("policy", ["train", "mask", "drop"])
def test_reasoning_is_trained_masked_or_dropped(tokenizer, tmp_path, family, policy):
    tokenizer = with_family(tokenizer, family)
    prepared = prepare(tmp_path, tokenizer, [THINK_ROW], reasoning=policy)
    whole, trained, masked = split(prepared, tokenizer)
    assert "Thirty days." in trained and trained.endswith(END_OF_TURN[family])
    parts = prepared.reports[0].conversation_parts
    assert parts["rows_with_reasoning"] == 1
    if policy == "train":
        assert THOUGHT in trained and "<think>" in trained
        assert parts["reasoning_trained"] == 1
    elif policy == "mask":
        assert THOUGHT in masked and THOUGHT not in trained
        assert "<think>" not in trained and "</think>" not in trained
        assert parts["reasoning_masked"] == 1
    else:
        assert THOUGHT not in whole
        assert parts["reasoning_dropped"] == 1
        assert "<think>" not in trained  # Qwen3 still renders an empty block: kept as context, never trained
        if family == "qwen3":
            assert "<think>" in whole and parts["empty_think_masked"] == 1


def test_think_block_inside_the_content_is_read_as_reasoning(tokenizer, tmp_path):
    tokenizer = with_family(tokenizer, "chatml")
    row = {
        "messages": [
            THINK_ROW["messages"][0],
            {"role": "assistant", "content": f"<think>{THOUGHT}</think>Thirty days."},
        ]
    }
    _whole, trained, masked = split(prepare(tmp_path, tokenizer, [row], reasoning="mask"), tokenizer)
    assert THOUGHT in masked and trained == "Thirty days.<|im_end|>"


@pytest.mark.parametrize("field", ["reasoning", "thinking"])
def test_other_reasoning_field_names_are_read(tokenizer, tmp_path, field):
    tokenizer = with_family(tokenizer, "chatml")
    answer = {"role": "assistant", "content": "Thirty days.", field: THOUGHT}
    _whole, trained, _ = split(
        prepare(tmp_path, tokenizer, [{"messages": [THINK_ROW["messages"][0], answer]}]), tokenizer
    )
    assert THOUGHT in trained


def test_multi_turn_reasoning_follows_each_templates_convention(tokenizer, tmp_path):
    """chatml renders (and trains) every turn's reasoning; Qwen3 leaves out the reasoning of turns before the
    last user message, exactly as it does when the model is served, and the report counts it."""
    chatml = with_family(tokenizer, "chatml")
    prepared = prepare(tmp_path / "chatml", chatml, [MULTI_TURN])
    _, trained, _ = split(prepared, chatml)
    assert EARLIER in trained and LATER in trained
    assert prepared.reports[0].conversation_parts["reasoning_trained"] == 2

    from transformers import AutoTokenizer

    qwen3 = with_family(AutoTokenizer.from_pretrained(tokenizer.name_or_path), "qwen3")
    prepared = prepare(tmp_path / "qwen3", qwen3, [MULTI_TURN])
    whole, trained, _masked = split(prepared, qwen3)
    assert EARLIER not in whole and LATER in trained
    assert "Service of the complaint." in trained and "<think>" not in trained.split("Service of the complaint.")[0]
    parts = prepared.reports[0].conversation_parts
    assert parts["reasoning_trained"] == 1 and parts["reasoning_not_rendered"] == 1
    assert "1 earlier turns' reasoning left out by the template" in prepared.reports[0].line()


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama-3.1"])
def test_training_text_is_the_released_templates_text(tokenizer, tmp_path, family):
    """The masking template renders exactly what the model's own template serves (markers aside)."""
    tokenizer = with_family(tokenizer, family)
    rows = [TOOL_ROW, MULTI_TURN] if family == "qwen3" else [TOOL_ROW]
    prepared = prepare(tmp_path, tokenizer, rows)
    for index, row in enumerate(rows):
        served = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)
        assert tokenizer.decode(prepared.train["input_ids"][index]) == served


def test_completion_loss_leaves_the_earlier_tool_call_untrained(tokenizer, tmp_path):
    tokenizer = with_family(tokenizer, "chatml")
    prepared = prepare(tmp_path, tokenizer, [TOOL_ROW], loss_on="completion")
    _, trained, masked = split(prepared, tokenizer)
    assert trained == "Your reply is due on 1 April 2026.<|im_end|>" and "compute_deadline" in masked
    assert prepared.reports[0].conversation_parts["tool_calls_masked"] == 1


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


def test_a_template_without_tool_support_is_refused(tokenizer, tmp_path):
    select_chat_template(tokenizer, "plain")
    with pytest.raises(UserError, match=r"1 rows have tools or tool calls, but the chat template does not render"):
        prepare(tmp_path, tokenizer, [TOOL_ROW])


def test_a_template_that_ignores_reasoning_is_refused_unless_dropped(tokenizer, tmp_path):
    tokenizer = with_family(tokenizer, "qwen2.5")
    with pytest.raises(UserError, match=r"^data.reasoning: train: 1 rows have reasoning, but the chat template"):
        prepare(tmp_path, tokenizer, [THINK_ROW])
    whole, _, _ = split(prepare(tmp_path, tokenizer, [THINK_ROW], reasoning="drop"), tokenizer)
    assert THOUGHT not in whole


def test_preview_tags_tool_calls_results_and_reasoning_with_their_status(tokenizer, tmp_path):
    from qlora_pipe.data.preview import preview_text

    tokenizer = with_family(tokenizer, "chatml")
    prepared = prepare(tmp_path, tokenizer, [TOOL_ROW, THINK_ROW], reasoning="mask")
    text = preview_text(prepared, tokenizer, 2, color=False)
    assert "tagged <<part, trained or masked>>" in text
    assert '<<tool call, trained>>[[<tool_call>\n{"name": "compute_deadline", "arguments"' in text
    assert f"<tool_response>\n<<tool result, masked>>{RESULT}" in text
    assert f"<<reasoning, masked>><think>\n{THOUGHT}" in text
    cached = prepare(tmp_path, tokenizer, [TOOL_ROW, THINK_ROW], reasoning="mask")  # the marks survive the cache
    assert (
        cached.cache_hit and preview_text(cached, tokenizer, 2, color=False).split("\n", 1)[1] == text.split("\n", 1)[1]
    )


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


def test_a_template_that_drops_the_tools_list_is_refused(tokenizer, tmp_path):
    """Calls and results rendered, the functions never shown: the model would learn calls it cannot see offered."""
    chatml = (Path(__file__).parents[1] / "qlora_pipe/data/template_files/chatml.jinja").read_text()
    start, end = chatml.index("{%- if tools -%}"), chatml.index("{%- for message in messages -%}")
    template = tmp_path / "no-tools-list.jinja"
    template.write_text(chatml[:start] + chatml[end:])
    select_chat_template(tokenizer, str(template))
    with pytest.raises(UserError, match=r"1 rows have tools or tool calls, but the chat template does not render"):
        prepare(tmp_path, tokenizer, [TOOL_ROW])
