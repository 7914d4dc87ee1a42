"""Data sources: file types, the Hub path, formats, mixing, eval splits, bad rows and the report."""

from __future__ import annotations

import json
import re

import pytest

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import SourceSection
from tests.helpers.data import (
    QA,
    answers,
    chat,
    prepare,
    rendered,
    texts,
    trained_texts,
    write_csv,
    write_jsonl,
    write_parquet,
)


def test_every_file_type_gives_the_same_examples(tokenizer, tmp_path):
    rows = [chat(q, a) for q, a in QA]
    reference = prepare(tmp_path, tokenizer, train_path=write_jsonl(tmp_path / "f.jsonl", rows))
    assert len(reference.train) == 3 and reference.reports[0].rows_read == 3
    expected = [rendered(tokenizer, r["messages"]) for r in rows]
    assert texts(reference.train, tokenizer) == expected

    json_array = tmp_path / "f.json"
    json_array.write_text(json.dumps(rows, indent=2))
    csv_rows = [{"prompt": q, "completion": a} for q, a in QA]
    variants = {
        "json": str(json_array),
        "parquet": write_parquet(tmp_path / "f.parquet", rows),
        "csv": write_csv(tmp_path / "f.csv", csv_rows, ["prompt", "completion"]),
    }
    for name, path in variants.items():
        prepared = prepare(tmp_path, tokenizer, cache=f"cache-{name}", train_path=path)
        assert prepared.reports[0].rows_read == 3, name
        assert prepared.train["input_ids"] == reference.train["input_ids"], name
        assert prepared.train["labels"] == reference.train["labels"], name


def test_directory_and_glob_read_every_data_file_in_sorted_order(tokenizer, tmp_path):
    rows = [chat(q, a) for q, a in QA]
    reference = prepare(tmp_path, tokenizer, train_path=write_jsonl(tmp_path / "single.jsonl", rows))

    folder = tmp_path / "folder"
    write_jsonl(folder / "a.jsonl", rows[:1])
    write_parquet(folder / "b.parquet", rows[1:2])
    write_jsonl(folder / "nested" / "c.jsonl", rows[2:])
    (folder / "README.md").write_text("not data")
    from_dir = prepare(tmp_path, tokenizer, cache="cache-dir", train_path=str(folder))
    assert from_dir.reports[0].rows_read == 3
    assert from_dir.train["input_ids"] == reference.train["input_ids"]

    shards = tmp_path / "shards"
    for index, row in enumerate(rows):
        write_jsonl(shards / f"part-{index}.jsonl", [row])
    write_jsonl(shards / "other.jsonl", [chat("Not matched?", "No.")])
    from_glob = prepare(tmp_path, tokenizer, cache="cache-glob", train_path=str(shards / "part-*.jsonl"))
    assert from_glob.reports[0].rows_read == 3
    assert from_glob.train["input_ids"] == reference.train["input_ids"]


# ---------------------------------------------------------------------------------------------
# 2. The Hub code path (with a local dataset folder) and the cache


def test_hub_source_from_a_local_folder_is_read_and_never_cached(tokenizer, tmp_path):
    rows = [chat(q, a) for q, a in QA]
    folder = tmp_path / "hub-dataset"
    write_jsonl(folder / "data" / "train.jsonl", rows)
    reference = prepare(tmp_path, tokenizer, cache="cache-ref", train_path=write_jsonl(tmp_path / "f.jsonl", rows))

    data = {"sources": [SourceSection(hub=str(folder), split="train")]}
    first = prepare(tmp_path, tokenizer, **data)
    assert first.train["input_ids"] == reference.train["input_ids"]
    assert first.train["labels"] == reference.train["labels"]
    assert first.fingerprint is None and first.cache_hit is False
    second = prepare(tmp_path, tokenizer, **data)
    assert second.cache_hit is False
    assert second.train["input_ids"] == reference.train["input_ids"]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_missing_hub_source_is_a_user_error_naming_it(tokenizer, tmp_path):
    source = SourceSection(hub=str(tmp_path / "no-such-dataset"), split="validation")
    with pytest.raises(UserError, match=re.escape(f"data source {source.label()}: cannot load")):
        prepare(tmp_path, tokenizer, sources=[source])
    assert source.label() == f"hub:{tmp_path / 'no-such-dataset'}[validation]"


def test_local_source_is_cached_and_reused(tokenizer, tmp_path):
    rows = [chat(q, a, system="Be brief.") for q, a in QA]
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    first = prepare(tmp_path, tokenizer, train_path=path, eval_fraction=0.3)
    assert first.cache_hit is False and first.fingerprint
    second = prepare(tmp_path, tokenizer, train_path=path, eval_fraction=0.3)
    assert second.cache_hit is True and second.fingerprint == first.fingerprint
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.train["labels"] == first.train["labels"]
    assert second.eval["input_ids"] == first.eval["input_ids"]
    assert [r.as_dict() for r in second.reports] == [r.as_dict() for r in first.reports]
    assert second.system_prompt == "Be brief."
    # Changing the file's contents changes the fingerprint: no stale reuse.
    write_jsonl(tmp_path / "f.jsonl", [*rows[:2], chat("New?", "Yes.")])
    third = prepare(tmp_path, tokenizer, train_path=path, eval_fraction=0.3)
    assert third.cache_hit is False and third.fingerprint != first.fingerprint


# ---------------------------------------------------------------------------------------------
# 3. Formats, detection and column mapping

USER_ANSWER = [{"role": "user", "content": "What is a tort?"}, {"role": "assistant", "content": "A civil wrong."}]
FORMAT_ROWS = {
    "messages": ({"messages": USER_ANSWER}, USER_ANSWER),
    "sharegpt": (
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "What is a tort?"},
                {"from": "gpt", "value": "A civil wrong."},
            ]
        },
        [{"role": "system", "content": "Be brief."}, *USER_ANSWER],
    ),
    "alpaca": ({"instruction": "What is a tort?", "input": "", "output": "A civil wrong."}, USER_ANSWER),
    "prompt_completion": ({"prompt": "What is a tort?", "completion": "A civil wrong."}, USER_ANSWER),
}


@pytest.mark.parametrize("declared", ["explicit", "auto"])
@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_conversation_formats_become_the_same_messages(tokenizer, tmp_path, caplog, fmt, declared):
    row, messages = FORMAT_ROWS[fmt]
    source = SourceSection(
        path=write_jsonl(tmp_path / "f.jsonl", [row]), format=fmt if declared == "explicit" else "auto"
    )
    with caplog.at_level("INFO", logger="qlora_pipe.data.sources"):
        prepared = prepare(tmp_path, tokenizer, sources=[source])
    expected = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert prepared.train["input_ids"] == [expected]
    assert trained_texts(prepared.train, tokenizer) == ["A civil wrong.<|im_end|>"]
    if declared == "auto":
        assert f"detected format '{fmt}'" in caplog.text


def test_alpaca_input_is_appended_to_the_instruction(tokenizer, tmp_path):
    rows = [
        {"instruction": "Summarize.", "input": "The court ruled for the plaintiff.", "output": "Plaintiff won."},
        {"instruction": "Define tort.", "input": "", "output": "A civil wrong."},
        {"instruction": "Define lien.", "output": "A claim."},  # no input column at all
    ]
    prepared = prepare(tmp_path, tokenizer, train_path=write_jsonl(tmp_path / "f.jsonl", rows))
    assert texts(prepared.train, tokenizer) == [
        "<|im_start|>user\nSummarize.\n\nThe court ruled for the plaintiff.<|im_end|>\n"
        "<|im_start|>assistant\nPlaintiff won.<|im_end|>\n",
        "<|im_start|>user\nDefine tort.<|im_end|>\n<|im_start|>assistant\nA civil wrong.<|im_end|>\n",
        "<|im_start|>user\nDefine lien.<|im_end|>\n<|im_start|>assistant\nA claim.<|im_end|>\n",
    ]


@pytest.mark.parametrize("declared", ["text", "auto"])
def test_text_rows_are_the_text_plus_eos_all_trained(tokenizer, tmp_path, declared):
    docs = ["A tort is a civil wrong.", "Bail is security for appearance."]
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": d} for d in docs])
    prepared = prepare(tmp_path, tokenizer, sources=[SourceSection(path=path, format=declared)])
    expected = [tokenizer(d)["input_ids"] + [tokenizer.eos_token_id] for d in docs]
    assert prepared.train["input_ids"] == expected
    assert prepared.train["labels"] == expected
    assert texts(prepared.train, tokenizer) == [d + "<|im_end|>" for d in docs]
    assert prepared.system_prompt is None


def test_columns_mapping_renames_to_the_format_fields(tokenizer, tmp_path):
    rows = [{"question": q, "answer": a, "id": i} for i, (q, a) in enumerate(QA)]
    source = SourceSection(
        path=write_jsonl(tmp_path / "f.jsonl", rows),
        format="prompt_completion",
        columns={"prompt": "question", "completion": "answer"},
    )
    prepared = prepare(tmp_path, tokenizer, sources=[source])
    assert texts(prepared.train, tokenizer) == [rendered(tokenizer, chat(q, a)["messages"]) for q, a in QA]
    # The mapping also feeds auto-detection.
    auto = source.model_copy(update={"format": "auto"})
    assert prepare(tmp_path, tokenizer, cache="c2", sources=[auto]).train["input_ids"] == prepared.train["input_ids"]


def test_undetectable_format_is_a_user_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"cannot detect the format from columns \['answer', 'question'\]"):
        prepare(tmp_path, tokenizer, train_path=path)


# ---------------------------------------------------------------------------------------------
# 4. Mixing


def test_missing_data_file_is_a_user_error(tokenizer, tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match=re.escape(f"data file not found: {missing}")):
        prepare(tmp_path, tokenizer, train_path=missing)
    with pytest.raises(UserError, match="data file not found"):
        prepare(tmp_path, tokenizer, train_path=str(tmp_path / "none-*.jsonl"))


def test_csv_with_numeric_looking_answers_keeps_them_as_text(tokenizer, tmp_path):
    rows = [{"prompt": "What is six times seven?", "completion": "42"}, {"prompt": "One plus one?", "completion": "2"}]
    path = write_csv(tmp_path / "f.csv", rows, ["prompt", "completion"])
    prepared = prepare(tmp_path, tokenizer, train_path=path)
    assert answers(prepared.train, tokenizer) == ["42", "2"]


# ---------------------------------------------------------------------------------------------
# 7. The report
