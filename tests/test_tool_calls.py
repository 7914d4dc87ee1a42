"""Tool calls end to end: parsed back from answers, scored by eval, shown by chat --tools.

A tiny real 4-bit run learns to answer every question with one call of ``define_term``; eval scores its
function names and arguments against the held-out references (the base scores 0), and chat renders the
tools into the prompt and prints the call it parses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from qlora_pipe.cli import main
from qlora_pipe.evaluate.tool_calls import ToolCall, parse_tool_calls, score_tool_calls
from qlora_pipe.recipe import validate_recipe
from tests.conftest import recipe_dict

TOOLS = [{"type": "function", "function": {"name": "define_term", "parameters": {"type": "object"}}}]
CALL = {"type": "function", "function": {"name": "define_term", "arguments": {"term": "lease"}}}
WORDS = ["lease", "tort", "deed", "lien", "bond", "will", "trust", "claim"]


def test_parses_each_templates_call_format():
    hermes = '<tool_call>\n{"name": "find_statute", "arguments": {"area": "torts"}}\n</tool_call>'
    assert parse_tool_calls(hermes) == [ToolCall("find_statute", {"area": "torts"})]
    assert parse_tool_calls(f"<think>\nA statute question.\n</think>\n\n{hermes}\n{hermes}") == [
        ToolCall("find_statute", {"area": "torts"})
    ] * 2
    assert parse_tool_calls('{"name": "compute_deadline", "parameters": {"days": 30}}') == [
        ToolCall("compute_deadline", {"days": 30})
    ]
    mistral = '[TOOL_CALLS][{"name": "define_term", "arguments": "{\\"term\\": \\"lien\\"}"}]'
    assert parse_tool_calls(mistral) == [ToolCall("define_term", {"term": "lien"})]
    assert parse_tool_calls("A tort is a civil wrong.") == []
    assert parse_tool_calls('{"answer": 3}') == []
    assert parse_tool_calls('<tool_call>\n{"name": "define_term", "arguments": {"term"') == [ToolCall(None)]


def test_scores_names_and_exact_arguments_on_rows_whose_reference_calls():
    ref = '<tool_call>\n{"name": "define_term", "arguments": {"term": "lien"}}\n</tool_call>'
    wrong_args = ref.replace("lien", "lease")
    wrong_name = ref.replace("define_term", "find_statute")
    scores = score_tool_calls([ref, wrong_args, wrong_name, "no call", "anything"], [ref, ref, ref, ref, "plain"])
    assert scores == {"tool_rows": 4, "tool_name_accuracy": 0.5, "tool_arguments_exact": 0.25}
    assert score_tool_calls(["a"], ["b"]) == {}


def _row(i: int, word: str, answer: bool) -> dict:
    messages = [{"role": "user", "content": f"What is a {word}? ({i})"}, {"role": "assistant", "content": "", "tool_calls": [CALL]}]
    if answer:
        messages += [{"role": "tool", "content": "A lease is a rental contract."}, {"role": "assistant", "content": "A rental contract."}]
    return {"tools": TOOLS, "messages": messages}


@pytest.fixture(scope="module")
def tool_run(tiny_model_dir, tmp_path_factory) -> Path:
    import torch

    from qlora_pipe.training.stage import run_training

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tool-run")
    train, held_out = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps(_row(i, WORDS[i % 8], i % 2 == 0)) + "\n" for i in range(32)))
    held_out.write_text("".join(json.dumps(_row(100 + i, WORDS[i], False)) + "\n" for i in range(4)))
    raw = recipe_dict(tiny_model_dir, root / "runs", max_steps=16, report_to=["none"])
    raw["data"].update(train_path=str(train), eval_path=str(held_out), chat_template="chatml", max_length=1024)
    return run_training(validate_recipe(raw)).run_dir.root


def test_eval_scores_tool_calls_base_against_tuned(tool_run):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", str(tool_run), "--batch-size", "4"]) == 0
    result = json.loads((tool_run / "eval.json").read_text())
    assert result["base"]["tool_rows"] == result["tuned"]["tool_rows"] == 4
    assert result["base"]["tool_name_accuracy"] == 0.0
    assert result["tuned"]["tool_name_accuracy"] == 1.0 and result["tuned"]["tool_arguments_exact"] == 1.0
    table = out.getvalue()
    assert "4 of them call tools" in table
    assert "tool calls: function names right" in table and "tool calls: arguments exact" in table


def test_chat_with_tools_renders_them_and_shows_the_parsed_call(tool_run, tmp_path, capsys):
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps({"tools": TOOLS}))
    args = ["chat", str(tool_run), "--tools", str(tools_file), "--prompt", "What is a deed?", "--max-new-tokens", "80"]
    assert main(args) == 0
    assert '[tool call, not executed] define_term({"term": "lease"})' in capsys.readouterr().out


def test_interactive_chat_keeps_the_call_and_the_tool_result_in_the_conversation(tool_run, capsys):
    from qlora_pipe.evaluate.chat import chat_loop, load_chat_model, load_tools
    from qlora_pipe.generation import GenerationSettings

    chat = load_chat_model(tool_run)
    chat.tools = TOOLS
    lines = iter(["What is a bond?", "/tool A bond is a promise to pay."])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    history = chat_loop(chat, None, GenerationSettings(max_new_tokens=60), read)
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[1]["tool_calls"] == [CALL] and history[2]["content"] == "A bond is a promise to pay."
    assert "tools: define_term; /tool RESULT answers a tool call" in capsys.readouterr().out
    assert load_tools  # the same loader the command uses


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        ("{not json", "not valid JSON"),
        ('{"tools": []}', "no functions listed"),
        ('[{"description": "x"}]', "tools list has an entry without a function name"),
    ],
)
def test_bad_tools_file_is_one_line_and_exit_code_2(tool_run, tmp_path, capsys, content, message):
    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content)
    assert main(["chat", str(tool_run), "--tools", str(path), "--prompt", "q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: chat --tools") and message in err[0]


def test_a_template_without_tools_is_refused_by_chat(tiny_model_dir, tmp_path, capsys):
    """The tiny model's own ChatML template has no tool support: chat --tools says so before generating."""
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(TOOLS))
    assert main(["chat", str(tiny_model_dir), "--tools", str(path), "--prompt", "q"]) == 2
    assert "does not render tools" in capsys.readouterr().err


@pytest.mark.skipif(
    os.environ.get("QLORA_PIPE_SLOW_TESTS") != "1" or not Path("models/quickstart-base/config.json").is_file(),
    reason="trains the bundled tool recipe (about 5 minutes): set QLORA_PIPE_SLOW_TESTS=1 after building the base",
)
def test_bundled_tool_recipe_beats_the_base_on_held_out_function_names(tmp_path):
    from qlora_pipe.evaluate.evaluation import run_eval
    from qlora_pipe.recipe import load_recipe
    from qlora_pipe.training.stage import run_training

    recipe = load_recipe("recipes/quickstart-tools.yaml", [f"output_dir={tmp_path}"])
    result = run_eval(run_training(recipe).run_dir.root)
    assert result["tuned"]["tool_name_accuracy"] > result["base"]["tool_name_accuracy"] + 0.5
