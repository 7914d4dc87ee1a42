"""Loss masking, token by token: which tokens each template, format and loss_on setting trains."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from itertools import groupby
from pathlib import Path

import pytest
import yaml

from qlora_pipe.data.chat_templates import select_chat_template
from qlora_pipe.data.prepare import prepare_data
from qlora_pipe.data.prepared import IGNORE
from qlora_pipe.data.preview import DIM, GREEN, RESET, render_example
from qlora_pipe.errors import UserError
from qlora_pipe.models.loading import ensure_distinct_pad, load_tokenizer
from qlora_pipe.recipe import DataSection, SourceSection, validate_recipe
from tests.helpers.data import add_llama_3_tokens

REPO = Path(__file__).resolve().parents[1]

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a tort?"},
    {"role": "assistant", "content": "A civil wrong."},
    {"role": "user", "content": "And a lien?"},
    {"role": "assistant", "content": "A claim on property."},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def trained_runs(input_ids, labels, tokenizer) -> list[str]:
    """The decoded contiguous spans of trained tokens, in order."""
    runs = []
    for trained, run in groupby(zip(input_ids, labels, strict=True), key=lambda pair: pair[1] != IGNORE):
        if trained:
            runs.append(tokenizer.decode([token for token, _ in run]))
    return runs


def untrained_text(input_ids, labels, tokenizer) -> str:
    return tokenizer.decode([t for t, label in zip(input_ids, labels, strict=True) if label == IGNORE])


def with_template(tokenizer, name: str):
    """The tiny tokenizer set up for one template family; returns (tokenizer, end-of-turn text)."""
    if name == "own":
        return tokenizer, "<|im_end|>"
    if name == "llama-3":
        add_llama_3_tokens(tokenizer)
        assert select_chat_template(tokenizer, "llama-3") == "built-in llama-3"
        assert tokenizer.eos_token == "<|eot_id|>"  # the built-in template makes its end-of-turn the EOS
        return tokenizer, "<|eot_id|>"
    assert name == "mistral"
    tokenizer.add_special_tokens({"additional_special_tokens": ["<s>", "</s>"]})
    assert select_chat_template(tokenizer, "mistral") == "built-in mistral"
    tokenizer.eos_token, tokenizer.bos_token = "</s>", "<s>"
    return tokenizer, "</s>"


# Each family renders the assistant answer slightly differently (mistral puts a space before it).
ANSWER_PREFIX = {"own": "", "llama-3": "", "mistral": " "}


def prepare(tmp_path, tokenizer, rows, **data):
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    return prepare_data(DataSection(train_path=path, cache_dir=str(tmp_path / "cache"), **data), tokenizer)


# ---------------------------------------------------------------------------------------------
# 1-3. Templates x loss_on


@pytest.mark.parametrize("family", ["own", "llama-3", "mistral"])
def test_assistant_loss_trains_both_answers_and_their_end_of_turn(tokenizer, tmp_path, family):
    tokenizer, eot = with_template(tokenizer, family)
    prepared = prepare(tmp_path, tokenizer, [{"messages": TWO_TURNS}], loss_on="assistant")
    ids, labels = prepared.train["input_ids"][0], prepared.train["labels"][0]
    space = ANSWER_PREFIX[family]
    assert trained_runs(ids, labels, tokenizer) == [f"{space}A civil wrong.{eot}", f"{space}A claim on property.{eot}"]
    assert all(label in (IGNORE, token) for token, label in zip(ids, labels, strict=True))
    trained = [label for label in labels if label != IGNORE]
    assert trained[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(eot)
    masked = untrained_text(ids, labels, tokenizer)
    for text in ("Be brief.", "What is a tort?", "And a lien?"):
        assert text in masked
    assert "A civil wrong" not in masked and "A claim on property" not in masked
    assert prepared.system_prompt == "Be brief."
    assert prepared.reports[0].supervised_tokens == len(trained)


@pytest.mark.parametrize("family", ["own", "llama-3", "mistral"])
def test_completion_loss_trains_only_the_final_answer(tokenizer, tmp_path, family):
    tokenizer, eot = with_template(tokenizer, family)
    prepared = prepare(tmp_path, tokenizer, [{"messages": TWO_TURNS}], loss_on="completion")
    ids, labels = prepared.train["input_ids"][0], prepared.train["labels"][0]
    assert trained_runs(ids, labels, tokenizer) == [f"{ANSWER_PREFIX[family]}A claim on property.{eot}"]
    assert "A civil wrong." in untrained_text(ids, labels, tokenizer)


@pytest.mark.parametrize("family", ["own", "llama-3", "mistral"])
def test_all_loss_trains_every_token(tokenizer, tmp_path, family):
    tokenizer, _ = with_template(tokenizer, family)
    prepared = prepare(tmp_path, tokenizer, [{"messages": TWO_TURNS}], loss_on="all")
    ids, labels = prepared.train["input_ids"][0], prepared.train["labels"][0]
    assert labels == ids
    assert ids == tokenizer.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True)["input_ids"]
    assert prepared.reports[0].supervised_tokens == prepared.reports[0].total_tokens == len(ids)


# ---------------------------------------------------------------------------------------------
# 4. Formats


@pytest.mark.parametrize(
    ("fmt", "row"),
    [
        (
            "messages",
            {"messages": [{"role": "user", "content": "Define bail."}, {"role": "assistant", "content": "Security."}]},
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "Define bail."}, {"from": "gpt", "value": "Security."}]},
        ),
        ("alpaca", {"instruction": "Define", "input": "bail.", "output": "Security."}),
        ("prompt_completion", {"prompt": "Define bail.", "completion": "Security."}),
    ],
)
def test_every_format_trains_exactly_the_answer_and_eos(tokenizer, tmp_path, fmt, row):
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    data = DataSection(sources=[SourceSection(path=path, format=fmt)], cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(data, tokenizer)
    ids, labels = prepared.train["input_ids"][0], prepared.train["labels"][0]
    assert trained_runs(ids, labels, tokenizer) == ["Security.<|im_end|>"]
    assert [label for label in labels if label != IGNORE][-1] == tokenizer.eos_token_id
    assert "Define" in untrained_text(ids, labels, tokenizer)


# ---------------------------------------------------------------------------------------------
# 5. The pad rule


def test_pad_equal_to_eos_is_replaced_by_a_distinct_token(tokenizer):
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    ensure_distinct_pad(tokenizer)
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_distinct_pad_is_kept(tokenizer):
    ensure_distinct_pad(tokenizer)
    assert tokenizer.pad_token == "<|pad|>"


def tokenizer_without_pad_candidates(eos: str | None = "</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "</s>": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"eos_token": eos, "pad_token": eos} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)


def test_no_pad_candidate_is_a_user_error():
    tokenizer = tokenizer_without_pad_candidates()
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    with pytest.raises(UserError, match=re.escape("no pad token distinct from EOS '</s>'")):
        ensure_distinct_pad(tokenizer)
    with pytest.raises(UserError, match="defines no EOS token"):
        ensure_distinct_pad(tokenizer_without_pad_candidates(eos=None))


# ---------------------------------------------------------------------------------------------
# 6. Template errors and custom templates


def test_recipe_choosing_llama3_without_its_tokens_is_a_user_error(tiny_model_dir, tmp_path):
    recipe = validate_recipe(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train_path": str(tmp_path / "t.jsonl"), "chat_template": "llama-3"},
        }
    )
    missing = "<|start_header_id|>, <|end_header_id|>, <|eot_id|>"
    with pytest.raises(UserError, match=re.escape(f"llama-3 needs the tokens {missing}")):
        load_tokenizer(recipe)


def test_missing_template_file_is_a_user_error(tokenizer, tmp_path):
    missing = tmp_path / "nope.jinja"
    with pytest.raises(UserError, match=re.escape(f"file not found: {missing}")):
        select_chat_template(tokenizer, str(missing))
    with pytest.raises(UserError, match="neither a built-in template"):
        select_chat_template(tokenizer, "vicuna")


def test_custom_template_file_is_installed_and_used(tokenizer, tmp_path):
    template = (
        "{%- for m in messages -%}"
        "{{- '<|im_start|>' + m['role'] + ':\\n' -}}"
        "{%- if m['role'] == 'assistant' -%}"
        "{%- generation -%}{{- m['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
        "{%- else -%}{{- m['content'] + '<|im_end|>' -}}{%- endif -%}"
        "{%- endfor -%}"
    )
    path = tmp_path / "custom.jinja"
    path.write_text(template)
    assert select_chat_template(tokenizer, str(path)) == f"file {path}"
    assert tokenizer.chat_template == template
    prepared = prepare(tmp_path, tokenizer, [{"messages": TWO_TURNS[1:3]}])
    ids, labels = prepared.train["input_ids"][0], prepared.train["labels"][0]
    assert (
        tokenizer.decode(ids)
        == "<|im_start|>user:\nWhat is a tort?<|im_end|><|im_start|>assistant:\nA civil wrong.<|im_end|>"
    )
    assert trained_runs(ids, labels, tokenizer) == ["A civil wrong.<|im_end|>"]


def test_conversations_need_a_chat_template(tokenizer, tmp_path):
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="has no chat template"):
        prepare(tmp_path, tokenizer, [{"messages": TWO_TURNS}])
    # Plain text needs no template.
    prepared = prepare(tmp_path, tokenizer, [{"text": "Bail is security."}])
    assert prepared.train["labels"] == prepared.train["input_ids"]


# ---------------------------------------------------------------------------------------------
# 7. The preview


def test_render_example_brackets_exactly_the_trained_spans(tokenizer, tmp_path):
    prepared = prepare(tmp_path, tokenizer, [{"messages": TWO_TURNS[:3]}])
    ids, labels = prepared.train["input_ids"][0], prepared.train["labels"][0]
    prompt = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is a tort?<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = render_example(ids, labels, tokenizer, color=False)
    assert plain == f"{prompt}[[A civil wrong.<|im_end|>]]\n"
    colored = render_example(ids, labels, tokenizer, color=True)
    assert colored == f"{DIM}{prompt}{RESET}{GREEN}A civil wrong.<|im_end|>{RESET}{DIM}\n{RESET}"
    assert "[[" not in colored
    assert (GREEN, DIM, RESET) == ("\x1b[32m", "\x1b[2m", "\x1b[0m")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    env["HF_DATASETS_CACHE"] = str(cwd / "hf-datasets")
    return subprocess.run(
        [sys.executable, "-m", "qlora_pipe.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_data_command_previews_and_reports_errors(tiny_model_dir, tmp_path):
    data_path = write_jsonl(tmp_path / "t.jsonl", [{"messages": TWO_TURNS[:3]}])
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train_path": data_path, "cache_dir": str(tmp_path / "cache"), "max_length": 128},
    }
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    done = run_cli("data", str(recipe_path), "--preview", "1", "--color", "never", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "train: 1/1 rows kept" in done.stdout
    assert "[[A civil wrong.<|im_end|>]]" in done.stdout
    assert "\x1b[" not in done.stdout

    missing = tmp_path / "missing.jsonl"
    recipe["data"]["train_path"] = str(missing)
    recipe_path.write_text(yaml.safe_dump(recipe))
    failed = run_cli("data", str(recipe_path), "--preview", "1", "--color", "never", cwd=tmp_path)
    assert failed.returncode == 2
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: data file not found: {missing}"]
    assert "Traceback" not in failed.stderr
    assert failed.stdout == ""
