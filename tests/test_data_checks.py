"""Data checks: mixing, eval split, duplicates, bad rows, overlength, and the report."""

from __future__ import annotations

import re

import pytest

from qlora_pipe.data.prepared import IGNORE
from qlora_pipe.errors import UserError
from qlora_pipe.recipe import SourceSection
from tests.helpers.data import (
    answers,
    chat,
    numbered,
    prepare,
    rendered,
    texts,
    trained_texts,
    write_jsonl,
)


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


def test_duplicate_rows_are_counted_and_dropped_with_dedupe(tokenizer, tmp_path):
    rows = numbered("A", 4)
    a = write_jsonl(tmp_path / "a.jsonl", [*rows, rows[1], rows[1], rows[3]])  # 3 repeats inside the file
    b = write_jsonl(tmp_path / "b.jsonl", [rows[0], *numbered("B", 2)])  # 1 repeat across files
    sources = [SourceSection(path=a), SourceSection(path=b)]
    counted = prepare(tmp_path, tokenizer, sources=sources)
    report = counted.reports[0]
    assert report.duplicate_rows == 4 and report.rows_kept == 10 and "duplicate row" not in report.dropped
    assert "4 duplicate rows" in report.line() and report.as_dict()["duplicate_rows"] == 4
    deduped = prepare(tmp_path, tokenizer, cache="cache2", sources=sources, dedupe=True)
    report = deduped.reports[0]
    assert report.duplicate_rows == 4 and report.dropped["duplicate row"] == 4 and report.rows_kept == 6
    assert sorted(answers(deduped.train, tokenizer)) == sorted(
        [f"A answer {i}." for i in range(4)] + [f"B answer {i}." for i in range(2)]
    )


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
