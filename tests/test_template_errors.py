"""Ordinary bugs in a user's chat template, named by the template's own error and line on one line: a syntax
error before any row is rendered, a runtime error on the rows it happens on (dropped and counted, as rows the
template refuses are), for SFT with and without {% generation %} markers and for the preference and GRPO
prompt rendering."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from qlora_pipe.cli import main
from qlora_pipe.data.preference import prepare_preference_data
from qlora_pipe.data.prepare import prepare_data
from qlora_pipe.data.prompts import prepare_prompt_data
from qlora_pipe.errors import UserError
from qlora_pipe.recipe import DataSection, validate_recipe
from tests.conftest import recipe_dict
from tests.helpers.data import chat, write_jsonl
from tests.helpers.recipes import dpo_recipe, grpo_recipe
from tests.helpers.tool_data import TOOL_ROW

# ChatML with markers; line 3 adds a number to the text of a user turn that says BOOM (a TypeError on that row).
MARKED = "\n".join(
    [
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}",
        "{%- if message['role'] == 'assistant' %}{%- generation %}{{- message['content'] + '<|im_end|>' }}"
        "{%- endgeneration %}{{- '\\n' }}",
        "{%- else %}{%- if 'BOOM' in message['content'] %}{{- message['content'] + 1 }}{%- endif %}"
        "{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}",
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    ]
)
UNMARKED = MARKED.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
EVERY_ROW = MARKED.replace("'BOOM' in message['content']", "true")  # fails on any conversation
TYPE_ERROR = 'the chat template fails on the row: TypeError at line 3: can only concatenate str (not "int") to str'
UNCLOSED = "{%- for message in messages %}\n{{- message['content'] }}\n{%- if message['role'] == 'user' %}\n"
UNKNOWN_FILTER = "{%- for message in messages %}\n{{- message['content'] | shout }}\n{%- endfor %}"
# A bug only in the branch that renders tool calls: TRL's family check renders one, a row without tools never.
TOOL_BUG = UNMARKED.replace(
    "{%- if message['role'] == 'assistant' %}",
    "{%- if message.tool_calls %}{{- message.tool_calls | length + 'x' }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}",
)
QUESTIONS = ["What is a tort?", "BOOM what is a lien?", "Define bail.", "What is a writ?", "BOOM define estoppel."]


def sft_rows(tmp_path: Path, questions=QUESTIONS) -> str:
    return write_jsonl(tmp_path / "rows.jsonl", [chat(q, f"Answer {i}.") for i, q in enumerate(questions)])


def tokenizer_with(tiny_model_dir: Path, template: str):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = template
    return tokenizer


def section(path: str, tmp_path: Path, **more) -> DataSection:
    return DataSection(train_path=path, max_length=128, cache_dir=str(tmp_path / "cache"), **more)


@pytest.mark.parametrize(("template", "masking"), [(MARKED, "{% generation %} markers"), (UNMARKED, "offsets")])
def test_template_runtime_errors_name_the_line_and_drop_only_their_rows(tiny_model_dir, tmp_path, template, masking):
    tokenizer = tokenizer_with(tiny_model_dir, template)
    prepared = prepare_data(section(sft_rows(tmp_path), tmp_path), tokenizer)
    report = prepared.reports[0]
    assert dict(report.dropped) == {TYPE_ERROR: 2} and report.rows_kept == 3 and masking in report.masking
    everything = section(sft_rows(tmp_path / "all", ["BOOM one?", "BOOM two?"]), tmp_path / "all")
    with pytest.raises(UserError, match=r"no usable rows after tokenization \(.*dropped: 2 " + TYPE_ERROR[:40]):
        prepare_data(everything, tokenizer)
    whole = section(sft_rows(tmp_path / "whole"), tmp_path / "whole", loss_on="all")
    assert dict(prepare_data(whole, tokenizer).reports[0].dropped) == {TYPE_ERROR: 2}


@pytest.mark.parametrize(
    "template", [EVERY_ROW, EVERY_ROW.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")]
)
def test_a_template_that_fails_on_every_conversation_is_named_not_misdiagnosed(tiny_model_dir, tmp_path, template):
    """With markers TRL's end-of-turn check swallowed the error ("leaves the end-of-turn token outside the loss
    mask"); without, TRL's family check raised it from inside its helpers."""
    with pytest.raises(UserError) as refused:
        prepare_data(section(sft_rows(tmp_path), tmp_path), tokenizer_with(tiny_model_dir, template))
    assert str(refused.value).startswith(
        "the chat template fails on a plain user/assistant conversation: TypeError at line 3: can only concatenate"
    ), refused.value


def test_a_bug_in_the_tool_branch_is_named_where_rows_need_it(tiny_model_dir, tmp_path):
    tokenizer = tokenizer_with(tiny_model_dir, TOOL_BUG)
    assert prepare_data(section(sft_rows(tmp_path, ["What is a tort?"] * 2), tmp_path), tokenizer).reports[0].rows_kept
    path = write_jsonl(tmp_path / "tools.jsonl", [TOOL_ROW, chat("What is a lien?", "A claim.")])
    with pytest.raises(
        UserError, match=r"does not render them .*\(it fails on a conversation with tools: TypeError at line 2"
    ):
        prepare_data(section(path, tmp_path / "tools"), tokenizer)


@pytest.mark.parametrize(
    ("template", "line"),
    [(UNCLOSED, "line 3: Unexpected end of template"), (UNKNOWN_FILTER, "line 2: No filter named 'shout'")],
)
def test_a_template_that_does_not_compile_is_one_line_before_any_row(tiny_model_dir, tmp_path, capsys, template, line):
    file = tmp_path / "mine.jinja"
    file.write_text(template)
    raw = recipe_dict(tiny_model_dir, tmp_path / "runs")
    raw["data"].update(chat_template=str(file), train_path=str(tmp_path / "never-read.jsonl"), eval_path=None)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert main(["data", str(tmp_path / "recipe.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: data.chat_template: {file} does not compile: {line}"), err
    with pytest.raises(UserError, match=f"the chat template of .* does not compile: {line}"):  # the model's own
        prepare_data(section(sft_rows(tmp_path), tmp_path), tokenizer_with(tiny_model_dir, template))


def test_preference_and_grpo_rows_a_template_fails_on_are_dropped_and_counted(tiny_model_dir, tmp_path):
    pairs = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": "Yes."}],
              "rejected": [{"role": "assistant", "content": "No."}]} for q in QUESTIONS]  # fmt: skip
    prompts = [{"prompt": [{"role": "user", "content": q}], "answer": "Area: torts"} for q in QUESTIONS]
    tokenizer = tokenizer_with(tiny_model_dir, MARKED)
    dpo = dpo_recipe(tiny_model_dir, tmp_path)
    dpo["data"].update(train_path=write_jsonl(tmp_path / "pairs.jsonl", pairs), eval_path=None)
    data = validate_recipe(dpo).data
    assert dict(prepare_preference_data(data, tokenizer).reports[0].dropped) == {TYPE_ERROR: 2}
    grpo = grpo_recipe(tiny_model_dir, tmp_path)
    grpo["data"].update(train_path=write_jsonl(tmp_path / "prompts.jsonl", prompts), eval_path=None)
    assert dict(prepare_prompt_data(validate_recipe(grpo), tokenizer).reports[0].dropped) == {TYPE_ERROR: 2}
    with pytest.raises(UserError, match="no usable preference pairs .*dropped: 5 " + TYPE_ERROR[:40]):
        prepare_preference_data(data, tokenizer_with(tiny_model_dir, EVERY_ROW))
