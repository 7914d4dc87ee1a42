"""Preference data (methods dpo, orpo and kto): pairs and unpaired KTO rows checked and dropped by reason, the
prompt cut to data.max_length oldest turns first, prompt turns that are not text, and Hub pairs whose prompt is the
shared turns of two whole conversations, read like the local pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_pipe.data.preference import prepare_preference_data, to_pair
from qlora_pipe.errors import UserError
from qlora_pipe.recipe import validate_recipe
from tests.conftest import recipe_dict
from tests.helpers.data import write_jsonl
from tests.helpers.recipes import PAIRS_TRAIN


def test_preference_rows_are_checked_and_dropped_by_reason(tokenizer, tiny_model_dir, tmp_path):
    assert to_pair({"prompt": "q", "chosen": "a"}) == "not a prompt/chosen/rejected row"
    assert to_pair({"prompt": "q", "chosen": "a", "rejected": "a"}) == "chosen and rejected are identical"
    assert to_pair({"prompt": "q", "chosen": " ", "rejected": "b"}) == "empty chosen or rejected answer"
    assistant_last = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert (
        to_pair({"prompt": assistant_last, "chosen": "a", "rejected": "b"})
        == "the prompt does not end with a user turn"
    )
    pair = to_pair({"prompt": "What is a tort?", "chosen": "A civil wrong.", "rejected": "A contract."})
    assert pair["prompt"] == [{"role": "user", "content": "What is a tort?"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "A civil wrong."}]

    rows = [
        {"prompt": "What is a tort?", "chosen": "A civil wrong.", "rejected": "A contract."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a lien?"}],
         "chosen": {"role": "assistant", "content": "A claim on property."}, "rejected": "A tort."},
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},
        {"prompt": "Empty?", "chosen": "", "rejected": "No."},
        {"prompt": "Long? " * 200, "chosen": "Yes.", "rejected": "No."},
    ]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs")
    raw["method"] = "dpo"
    raw["data"] = {"train_path": str(path), "max_length": 128}
    data = prepare_preference_data(validate_recipe(raw).data, tokenizer, 7)
    report = data.reports[0]
    assert (report.rows_read, report.rows_kept, len(data.train)) == (5, 2, 2)
    assert dict(report.dropped) == {
        "chosen and rejected are identical": 1,
        "empty chosen or rejected answer": 1,
        "longer than data.max_length": 1,
    }
    rows[0]["chosen"] = "A wrong done to someone."  # changed data: a resumed run would refuse it
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert prepare_preference_data(validate_recipe(raw).data, tokenizer, 7).fingerprint != data.fingerprint
    raw["data"]["on_bad_row"] = "error"
    with pytest.raises(UserError, match=r"pairs\.jsonl: row 3: chosen and rejected are identical"):
        prepare_preference_data(validate_recipe(raw).data, tokenizer, 7)

    # The prompt goes first, oldest turns first; answers are never cut. data.overlength decides the rest.
    history = [{"role": "user", "content": "Earlier? " * 60}, {"role": "assistant", "content": "Yes. " * 30}]
    system = {"role": "system", "content": "Be brief."}
    last = {"role": "user", "content": "What is a lien?"}
    long_rows = [
        {"prompt": [system, *history, last], "chosen": "A claim on property.", "rejected": "A tort."},
        {"prompt": "Long? " * 200, "chosen": "Yes.", "rejected": "No."},  # one user turn: cannot be cut
    ]
    path.write_text("\n".join(json.dumps(r) for r in long_rows) + "\n")
    raw["data"].update(on_bad_row="drop", overlength="truncate")
    data = prepare_preference_data(validate_recipe(raw).data, tokenizer, 7)
    assert data.train[0]["prompt"] == [system, last] and data.train[0]["chosen"][0]["content"] == "A claim on property."
    assert data.reports[0].truncated == 1
    assert dict(data.reports[0].dropped) == {"longer than data.max_length with the prompt cut": 1}
    raw["data"]["overlength"] = "error"
    with pytest.raises(UserError, match=r"train: row 1 is longer than data\.max_length 128"):
        prepare_preference_data(validate_recipe(raw).data, tokenizer, 7)


def test_prompt_turns_that_are_not_text_are_dropped_by_reason(tokenizer, tiny_model_dir, tmp_path):
    """A prompt turn whose content is null, a number or a list (or whose role no template knows) is dropped
    and counted, for pairs and KTO rows alike, instead of ending in the template's UndefinedError."""
    good = {"prompt": "What is a tort?", "chosen": "A civil wrong.", "rejected": "A contract."}
    bad_turns = [
        {"role": "user", "content": None},
        {"role": "user", "content": 42},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    rows = [good] + [{**good, "prompt": [{"role": "system", "content": "Hi."}, turn]} for turn in bad_turns]
    rows.append({**good, "prompt": [{"role": "narrator", "content": "Once."}, {"role": "user", "content": "q"}]})
    path = Path(write_jsonl(tmp_path / "pairs.jsonl", rows))
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs")
    raw["method"] = "dpo"
    raw["data"] = {"train_path": str(path), "max_length": 128}
    report = prepare_preference_data(validate_recipe(raw).data, tokenizer, 7).reports[0]
    assert (report.rows_read, report.rows_kept) == (5, 1)
    assert dict(report.dropped) == {
        "the prompt has a turn whose content is not text": 3,
        "the prompt has a turn that is not system, user or assistant": 1,
    }
    kto = [
        {"prompt": "q", "completion": "a", "label": True},
        {"prompt": [bad_turns[0]], "completion": "a", "label": False},
    ]
    raw["data"]["train_path"] = write_jsonl(tmp_path / "kto.jsonl", kto)
    report = prepare_preference_data(validate_recipe(raw).data, tokenizer, 7, method="kto").reports[0]
    assert dict(report.dropped) == {"the prompt has a turn whose content is not text": 1}


def test_hub_pairs_with_implicit_prompts_read_like_local_pairs(tokenizer, tiny_model_dir, tmp_path):
    """The Hub path (a local folder in a Hub dataset's layout, parquet, read by datasets.load_dataset) with the
    layout of many Hub preference sets: no prompt column, chosen and rejected as whole conversations, the
    shared turns being the prompt; columns renamed by the recipe. The pairs are the bundled local ones."""
    from datasets import Dataset

    local = [json.loads(line) for line in PAIRS_TRAIN.read_text().splitlines()[:12]]

    def conversation(row, answer):
        return row["prompt"] + [{"role": "assistant", "content": row[answer]}]  # system + user + answer

    hub_rows = [{"good": conversation(r, "chosen"), "bad": conversation(r, "rejected"), "score": 1.0} for r in local]
    folder = tmp_path / "hub-prefs"
    (folder / "data").mkdir(parents=True)
    Dataset.from_list(hub_rows).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs")
    raw["method"] = "dpo"
    raw["data"] = {"sources": [{"hub": str(folder), "columns": {"chosen": "good", "rejected": "bad"}}]}
    from_hub = prepare_preference_data(validate_recipe(raw).data, tokenizer, 7)
    raw["data"] = {"train_path": str(PAIRS_TRAIN), "max_train_samples": 12}
    from_file = prepare_preference_data(validate_recipe(raw).data, tokenizer, 7)
    key = lambda pair: json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]])  # noqa: E731
    assert sorted(map(key, from_hub.train)) == sorted(map(key, from_file.train)) and len(from_hub.train) == 12
    assert from_hub.reports[0].rows_read == 12 and not from_hub.reports[0].dropped
