"""Data stage: rows checked and counted by reason; the assistant-only mask covers EOS."""

from __future__ import annotations

import json

import pytest

from qlora_pipe.data.prepare import prepare_data, training_chat_template
from qlora_pipe.errors import UserError
from qlora_pipe.recipe import DataSection

SYSTEM = {"role": "system", "content": "Be brief."}


def conversation(question: str, answer: str) -> dict:
    return {"messages": [SYSTEM, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_bad_rows_are_dropped_and_counted_by_reason(tokenizer, tmp_path):
    rows = [
        conversation("What is a tort?", "A civil wrong."),
        {"messages": [{"role": "user", "content": "no answer here"}]},
        {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
        {"text": "not a conversation"},
        conversation("Long?", "word " * 400),
    ]
    data = DataSection(train_path=write_jsonl(tmp_path / "t.jsonl", rows), max_length=128, cache_dir=str(tmp_path))
    prepared = prepare_data(data, tokenizer)
    report = prepared.reports[0]
    assert report.rows_read == 7 and report.rows_kept == 1 and len(prepared.train) == 1
    assert report.dropped == {
        "no assistant turn": 1,
        "unknown role": 1,
        "empty message": 1,
        "missing or non-string field": 2,
        "longer than max_length 128": 1,
    }
    assert prepared.system_prompt == "Be brief."
    assert 0 < report.supervised_tokens < report.total_tokens


def test_empty_result_is_an_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(UserError, match="no usable rows after checks"):
        prepare_data(DataSection(train_path=path, cache_dir=str(tmp_path)), tokenizer)


def test_assistant_mask_trains_the_answer_and_its_end_of_turn_token(tokenizer):
    template = training_chat_template(tokenizer)
    messages = conversation("What is a tort?", "A civil wrong.")["messages"]
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=template
    )
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(trained) == "A civil wrong.<|im_end|>"
    assert trained[-1] == tokenizer.eos_token_id


def test_template_that_masks_eos_is_refused(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}<|im_end|>\n"
        "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    )
    with pytest.raises(UserError, match="end-of-turn token outside the loss mask"):
        training_chat_template(tokenizer)
