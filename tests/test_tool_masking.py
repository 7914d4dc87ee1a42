"""Tool calls and reasoning traces, token by token, on six template families (tests/helpers/tool_data.py).

Each case checks which tokens are trained: the tool call is, the tool result and the tools list are not;
reasoning follows data.reasoning; an empty thinking block is never trained; multi-turn reasoning follows
the template's own convention; the training text is the released templates' text; the preview tags each
part with what training does with it.
"""

from __future__ import annotations

import pytest

from tests.helpers.tool_data import (
    EARLIER,
    END_OF_TURN,
    FAMILIES,
    LATER,
    MULTI_TURN,
    RESULT,
    THINK_ROW,
    THOUGHT,
    TOOL_ROW,
    prepare,
    split,
    with_family,
)


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
