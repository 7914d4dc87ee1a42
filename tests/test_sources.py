"""Data sources: file types, the Hub path, formats, mixing, eval splits, bad rows and the report."""

from __future__ import annotations

import csv
import json
import re

import pytest
from transformers import AutoTokenizer

from qlora_pipe.data import IGNORE, prepare_data
from qlora_pipe.errors import UserError
from qlora_pipe.recipe import DataSection, SourceSection

QA = [("What is a tort?", "A civil wrong."), ("What is a lien?", "A claim on property."), ("Define bail.", "Security.")]


def chat(question: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_jsonl(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_parquet(path, rows) -> str:
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def write_csv(path, rows, fieldnames) -> str:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def texts(dataset, tokenizer) -> list[str]:
    return [tokenizer.decode(ids) for ids in dataset["input_ids"]]


def trained_texts(dataset, tokenizer) -> list[str]:
    return [
        tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])
        for ids, labels in zip(dataset["input_ids"], dataset["labels"], strict=True)
    ]


def rendered(tokenizer, messages) -> str:
    return tokenizer.decode(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """Keep datasets' own Arrow cache (csv/parquet/hub loading) inside the test's tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def prepare(tmp_path, tokenizer, seed: int = 42, cache: str = "cache", **data):
    return prepare_data(DataSection(cache_dir=str(tmp_path / cache), **data), tokenizer, seed)


# ---------------------------------------------------------------------------------------------
# 1. File types, directories and globs


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
    with caplog.at_level("INFO", logger="qlora_pipe.sources"):
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


def numbered(prefix: str, count: int) -> list[dict]:
    return [chat(f"{prefix} question {i}?", f"{prefix} answer {i}.") for i in range(count)]


def answers(dataset, tokenizer) -> list[str]:
    return [t.removesuffix("<|im_end|>") for t in trained_texts(dataset, tokenizer)]


def test_weights_repeat_and_subsample_sources(tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", numbered("A", 4))
    b = write_jsonl(tmp_path / "b.jsonl", numbered("B", 6))
    prepared = prepare(
        tmp_path, tokenizer, sources=[SourceSection(path=a, weight=2.0), SourceSection(path=b, weight=0.5)]
    )
    got = answers(prepared.train, tokenizer)
    from_a, from_b = [x for x in got if x.startswith("A")], [x for x in got if x.startswith("B")]
    assert sorted(from_a) == sorted([f"A answer {i}." for i in range(4)] * 2)
    assert len(from_b) == 3 and len(set(from_b)) == 3
    assert set(from_b) <= {f"B answer {i}." for i in range(6)}
    assert prepared.reports[0].rows_read == 10 and prepared.reports[0].rows_kept == 11


@pytest.mark.parametrize("samples", [3, 6, 9])
def test_samples_gives_exactly_n_rows(tokenizer, tmp_path, samples):
    path = write_jsonl(tmp_path / "a.jsonl", numbered("A", 4))
    prepared = prepare(tmp_path, tokenizer, sources=[SourceSection(path=path, samples=samples)])
    got = answers(prepared.train, tokenizer)
    assert len(got) == samples
    whole, rest = divmod(samples, 4)
    counts = sorted(got.count(f"A answer {i}.") for i in range(4))
    assert counts == sorted([whole + 1] * rest + [whole] * (4 - rest))


def test_sampling_is_seeded(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", numbered("A", 30))
    data = {"sources": [SourceSection(path=path, weight=0.5)]}
    first = answers(prepare(tmp_path, tokenizer, seed=1, cache="c1", **data).train, tokenizer)
    again = answers(prepare(tmp_path, tokenizer, seed=1, cache="c2", **data).train, tokenizer)
    other = answers(prepare(tmp_path, tokenizer, seed=2, cache="c3", **data).train, tokenizer)
    assert len(first) == len(other) == 15
    assert first == again
    assert first != other


# ---------------------------------------------------------------------------------------------
# 5. Held-out data


def test_eval_fraction_splits_disjointly_and_is_seeded(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", numbered("A", 20))
    split = {
        s: prepare(tmp_path, tokenizer, seed=s, cache=f"c{s}", train_path=path, eval_fraction=0.25) for s in (1, 2)
    }
    again = prepare(tmp_path, tokenizer, seed=1, cache="c1-again", train_path=path, eval_fraction=0.25)
    train, held = answers(split[1].train, tokenizer), answers(split[1].eval, tokenizer)
    assert len(train) == 15 and len(held) == 5
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(f"A answer {i}." for i in range(20))
    assert [r.name for r in split[1].reports] == ["train", "eval"]
    assert split[1].reports[1].rows_read == 5 and split[1].reports[1].rows_kept == 5
    assert answers(again.eval, tokenizer) == held and answers(again.train, tokenizer) == train
    assert set(answers(split[2].eval, tokenizer)) != set(held)


def test_eval_sources_and_duplicates_dropped_from_train(tokenizer, tmp_path):
    train_rows = numbered("A", 4)
    eval_rows = [train_rows[2], chat("Held out?", "Yes.")]
    prepared = prepare(
        tmp_path,
        tokenizer,
        sources=[SourceSection(path=write_jsonl(tmp_path / "train.jsonl", train_rows))],
        eval_sources=[SourceSection(path=write_jsonl(tmp_path / "eval.jsonl", eval_rows))],
    )
    assert answers(prepared.train, tokenizer) == ["A answer 0.", "A answer 1.", "A answer 3."]
    assert answers(prepared.eval, tokenizer) == ["A answer 2.", "Yes."]
    train_report, eval_report = prepared.reports
    assert train_report.dropped == {"duplicate of an eval row": 1}
    assert (train_report.rows_read, train_report.rows_kept) == (4, 3)
    assert (eval_report.rows_read, eval_report.rows_kept) == (2, 2)


# ---------------------------------------------------------------------------------------------
# 6. Bad rows, overlength, empty results, missing files


def test_bad_rows_of_every_format_are_counted_by_reason(tokenizer, tmp_path):
    good = chat("What is a tort?", "A civil wrong.")
    sources = [
        SourceSection(
            path=write_jsonl(
                tmp_path / "m.jsonl",
                [
                    good,
                    {"messages": [{"role": "user", "content": "no answer"}]},
                    {"messages": [{"role": "judge", "content": "x"}, {"role": "assistant", "content": "y"}]},
                    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \n"}]},
                    {"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]},
                ],
            ),
            format="messages",
        ),
        SourceSection(
            path=write_jsonl(
                tmp_path / "s.jsonl",
                [
                    {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
                    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]},
                ],
            ),
            format="sharegpt",
        ),
        SourceSection(
            path=write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q"}, {"instruction": "q", "output": 3}]),
            format="alpaca",
        ),
        SourceSection(path=write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}]), format="prompt_completion"),
    ]
    prepared = prepare(tmp_path, tokenizer, sources=sources)
    report = prepared.reports[0]
    assert report.dropped == {
        "no assistant turn": 1,
        "unknown role": 2,
        "empty message": 1,
        "missing or non-string field": 5,
    }
    assert (report.rows_read, report.rows_kept) == (10, 1)
    assert texts(prepared.train, tokenizer) == [rendered(tokenizer, good["messages"])]


def test_bad_text_rows_are_counted_by_reason(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "  "}, {"text": None}, {"text": 7}, {"text": "ok"}])
    prepared = prepare(tmp_path, tokenizer, sources=[SourceSection(path=path, format="text")])
    assert prepared.reports[0].dropped == {"empty row": 1, "missing or non-string field": 2}
    assert (prepared.reports[0].rows_read, prepared.reports[0].rows_kept) == (4, 1)
    assert texts(prepared.train, tokenizer) == ["ok<|im_end|>"]


def test_messages_field_that_is_a_string_is_a_missing_field(tokenizer, tmp_path):
    rows = [chat("What is a tort?", "A civil wrong."), {"messages": "Hello there"}]
    prepared = prepare(tmp_path, tokenizer, sources=[SourceSection(path=write_jsonl(tmp_path / "m.jsonl", rows))])
    assert prepared.reports[0].dropped == {"missing or non-string field": 1}


def test_text_and_conversation_sources_can_be_mixed(tokenizer, tmp_path):
    conversation = write_jsonl(tmp_path / "c.jsonl", [chat("What is a tort?", "A civil wrong.")])
    document = write_jsonl(tmp_path / "d.jsonl", [{"text": "Bail is security."}])
    prepared = prepare(tmp_path, tokenizer, sources=[SourceSection(path=conversation), SourceSection(path=document)])
    assert trained_texts(prepared.train, tokenizer) == ["A civil wrong.<|im_end|>", "Bail is security.<|im_end|>"]


def test_on_bad_row_error_names_source_and_row(tokenizer, tmp_path):
    rows = [chat("q", "a"), {"messages": [{"role": "user", "content": "no answer"}]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(UserError, match=re.escape(f"{path}: row 2: no assistant turn")):
        prepare(tmp_path, tokenizer, train_path=path, on_bad_row="error")


def long_and_short(tmp_path) -> str:
    return write_jsonl(tmp_path / "t.jsonl", [{"text": "A tort."}, {"text": "word " * 60}, {"text": "Bail."}])


def test_overlength_drop(tokenizer, tmp_path):
    prepared = prepare(tmp_path, tokenizer, train_path=long_and_short(tmp_path), max_length=16)
    assert texts(prepared.train, tokenizer) == ["A tort.<|im_end|>", "Bail.<|im_end|>"]
    assert prepared.reports[0].dropped == {"longer than max_length 16": 1}
    assert prepared.reports[0].truncated == 0


def test_overlength_truncate(tokenizer, tmp_path):
    prepared = prepare(tmp_path, tokenizer, train_path=long_and_short(tmp_path), max_length=16, overlength="truncate")
    full = tokenizer("word " * 60)["input_ids"]
    short = [len(tokenizer(t)["input_ids"]) + 1 for t in ("A tort.", "Bail.")]
    assert [len(ids) for ids in prepared.train["input_ids"]] == [short[0], 16, short[1]]
    assert prepared.train["input_ids"][1] == full[:16]
    assert prepared.train["labels"][1] == full[:16]
    assert prepared.reports[0].dropped == {}
    assert prepared.reports[0].truncated == 1
    assert prepared.reports[0].length_percentiles["max"] == 16


def test_row_of_exactly_max_length_is_not_counted_as_truncated(tokenizer, tmp_path):
    text = "word " * 40
    length = len(tokenizer(text)["input_ids"]) + 1  # + EOS
    assert length >= 16
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": text}])
    prepared = prepare(tmp_path, tokenizer, train_path=path, max_length=length, overlength="truncate")
    assert len(prepared.train["input_ids"][0]) == length  # kept whole, nothing was cut
    assert prepared.reports[0].truncated == 0


def test_overlength_error(tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"train: 1 rows exceed data.max_length 16 \(first: row 2\)"):
        prepare(tmp_path, tokenizer, train_path=long_and_short(tmp_path), max_length=16, overlength="error")


def test_nothing_left_after_tokenization_is_an_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 60}])
    with pytest.raises(UserError, match="no usable rows after tokenization"):
        prepare(tmp_path, tokenizer, train_path=path, max_length=16)


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


def test_report_lengths_and_supervised_share(tokenizer, tmp_path):
    rows = [chat(f"Question number {i}?", "word " * (i * 3 + 1)) for i in range(11)]
    prepared = prepare(tmp_path, tokenizer, train_path=write_jsonl(tmp_path / "f.jsonl", rows), max_length=512)
    lengths = sorted(len(ids) for ids in prepared.train["input_ids"])
    supervised = sum(label != IGNORE for labels in prepared.train["labels"] for label in labels)
    assert len(set(lengths)) == 11
    report = prepared.reports[0].as_dict()
    assert report["length_percentiles"] == {
        "p50": lengths[5],
        "p90": lengths[9],
        "p99": lengths[10],
        "max": lengths[10],
    }
    assert report["total_tokens"] == sum(lengths)
    assert report["supervised_tokens"] == supervised
    assert report["supervised_share"] == round(supervised / sum(lengths), 4)
    assert 0 < report["supervised_share"] < 1
    assert (report["rows_read"], report["rows_kept"], report["dropped"], report["truncated"]) == (11, 11, {}, 0)
    line = prepared.reports[0].line()
    assert line.startswith("train: 11/11 rows kept (dropped: none); ")
    assert f"p50={lengths[5]}" in line and f"max={lengths[10]}" in line
