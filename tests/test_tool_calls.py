"""Tool calls end to end: parsed back from answers, scored by eval, shown by chat --tools.

The parser and the scores are checked on answers in each supported format. A tiny real 4-bit run trained
on tool rows then goes through `qlora-pipe eval` (tool rows scored for both columns) and
`qlora-pipe chat --tools` (the functions rendered into the prompt, the reply's calls printed). Whether
training teaches a model to pick the right function is measured on the bundled recipe, whose base was
pretrained on legal text (the slow test at the end; docs/tools.md): the random 2-layer test model learns
the shape of a call but does not reproduce 60 tokens of JSON reliably.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from qlora_pipe.cli import main
from qlora_pipe.recipe import validate_recipe
from qlora_pipe.rewards.tool_calls import ToolCall, parse_tool_calls, score_tool_calls
from tests.conftest import recipe_dict

TOOLS = [{"type": "function", "function": {"name": "define_term", "parameters": {"type": "object"}}}]
CALL = {"type": "function", "function": {"name": "define_term", "arguments": {"term": "lease"}}}
WORDS = ["lease", "tort", "deed", "lien", "bond", "will", "trust", "claim"]


def test_parses_each_templates_call_format():
    hermes = '<tool_call>\n{"name": "find_statute", "arguments": {"area": "torts"}}\n</tool_call>'
    assert parse_tool_calls(hermes) == [ToolCall("find_statute", {"area": "torts"})]
    assert (
        parse_tool_calls(f"<think>\nA statute question.\n</think>\n\n{hermes}\n{hermes}")
        == [ToolCall("find_statute", {"area": "torts"})] * 2
    )
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
    messages = [
        {"role": "user", "content": f"What is a {word}? ({i})"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
    ]
    if answer:
        messages += [
            {"role": "tool", "content": "A lease is a rental contract."},
            {"role": "assistant", "content": "A rental contract."},
        ]
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
    # fp32: the same steps on every CPU, whether or not it has native bf16
    raw = recipe_dict(tiny_model_dir, root / "runs", max_steps=120, report_to=["none"], precision="fp32")
    raw["data"].update(train_path=str(train), eval_path=str(held_out), chat_template="chatml", max_length=1024)
    return run_training(validate_recipe(raw)).run_dir.root


def test_eval_scores_tool_calls_base_against_tuned(tool_run):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", str(tool_run), "--batch-size", "4"]) == 0
    result = json.loads((tool_run / "eval.json").read_text())
    base, tuned = result["base"], result["tuned"]
    assert base["tool_rows"] == tuned["tool_rows"] == 4
    assert base["tool_name_accuracy"] == base["tool_arguments_exact"] == 0.0  # a random model calls nothing
    assert tuned["loss"] < base["loss"] - 1.0  # the trained call is much likelier
    assert all(a["tuned"].startswith("<tool_call>") for a in result["answers"])
    expected = [score_tool_calls([a["tuned"]], [a["reference"]]) for a in result["answers"]]
    assert tuned["tool_name_accuracy"] == sum(e["tool_name_accuracy"] for e in expected) / 4
    table = out.getvalue()
    assert "4 of them call tools" in table
    assert "tool calls: function names right" in table and "tool calls: arguments exact" in table


def test_chat_with_tools_renders_them_into_the_prompt(tool_run, tmp_path, capsys):
    from qlora_pipe.evaluate.chat import load_chat_model
    from qlora_pipe.models.generation import chat_prompt_ids

    chat = load_chat_model(tool_run)
    question = [{"role": "user", "content": "What is a deed?"}]
    prompt = chat.tokenizer.decode(chat_prompt_ids(chat.tokenizer, question, TOOLS))
    assert '<tools>\n{"type": "function", "function": {"name": "define_term"' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps({"tools": TOOLS}))
    args = ["chat", str(tool_run), "--tools", str(tools_file), "--prompt", "What is a deed?", "--max-new-tokens", "80"]
    assert main(args) == 0
    reply = capsys.readouterr().out
    assert reply.startswith("<tool_call>")
    shown = [line for line in reply.splitlines() if line.startswith("[tool call, not executed]")]
    assert shown == [f"[tool call, not executed] {call.show()}" for call in parse_tool_calls(reply.split("\n[tool")[0])]


def test_parsed_calls_are_shown_and_kept_in_the_conversation():
    from qlora_pipe.evaluate.chat import assistant_turn

    reply = '<tool_call>\n{"name": "define_term", "arguments": {"term": "lease"}}\n</tool_call>'
    assert assistant_turn(reply, TOOLS) == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert assistant_turn(reply, None) == {"role": "assistant", "content": reply}  # no --tools: plain text
    assert assistant_turn("A deed transfers land.", TOOLS) == {"role": "assistant", "content": "A deed transfers land."}
    assert parse_tool_calls(reply)[0].show() == 'define_term({"term": "lease"})'


def test_interactive_chat_answers_a_tool_result(tool_run, capsys):
    from qlora_pipe.evaluate.chat import chat_loop, load_chat_model
    from qlora_pipe.models.generation import GenerationSettings

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
    assert history[2] == {"role": "tool", "content": "A bond is a promise to pay."}
    assert "tools: define_term; /tool RESULT answers a tool call" in capsys.readouterr().out


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
    # measured: 0.0% -> 40.0% (docs/tools.md); other CPUs round differently, so the bar is lower
    assert result["tuned"]["tool_name_accuracy"] >= result["base"]["tool_name_accuracy"] + 0.2


def test_no_ollama_modelfile_for_a_run_trained_on_tool_calls(tool_run, tmp_path):
    """Ollama's Go TEMPLATE renders plain messages only: a tool-trained run gets the reason, not a TEMPLATE
    that would drop the tools list at serving."""
    from qlora_pipe.export.gguf_command import tool_parts_trained, write_ollama_modelfile
    from qlora_pipe.runs import resolve_run

    run = resolve_run(tool_run)
    assert tool_parts_trained(run) == "tool calls"
    merged, folder = tmp_path / "merged", tmp_path / "gguf"
    merged.mkdir()
    folder.mkdir()
    (merged / "chat_template.jinja").write_text((tool_run / "chat_template.jinja").read_text())
    result = write_ollama_modelfile(run, merged, folder, folder / "never-read.gguf")
    assert result["written"] is False and "trained on tool calls" in result["reason"]
    assert "serve with llama.cpp" in result["reason"]
