"""GRPO prompts with tools: a row's `tools` (function schemas, as SFT tool rows list them) rendered into its
prompt by the chat template, in the data stage, the preview, and the prompts TRL generates from; a template
that cannot render tools refused in one line; the data report of prompt rows says what is true."""

from __future__ import annotations

import json

import pytest

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import validate_recipe
from tests.helpers.data import write_jsonl
from tests.helpers.recipes import grpo_recipe
from tests.helpers.tool_data import TOOLS

CALL_REWARD = {"function": "tool_call", "name": "call"}
STATUTE = [TOOLS[0]["function"]]  # given bare ({"name", "parameters"}), as SFT rows may


def tool_prompts(tmp_path, count: int = 4) -> str:
    rows = [
        {"prompt": f"Find the statute on topic {i}.", "tools": TOOLS if i % 2 else json.dumps(STATUTE), "answer": "x"}
        for i in range(count)
    ]
    rows.append({"prompt": "No functions here.", "answer": "y"})  # a row without tools keeps its plain prompt
    rows.append({"prompt": "Broken tools.", "tools": [{"description": "no name"}], "answer": "z"})
    return write_jsonl(tmp_path / "tool_prompts.jsonl", rows)


def tool_recipe(tiny_model_dir, tmp_path, name: str = "tools", template: str | None = "chatml", **training):
    raw = grpo_recipe(tiny_model_dir, tmp_path, name, rewards=[CALL_REWARD, {"function": "exact_match"}], **training)
    raw["data"].update(train_path=tool_prompts(tmp_path), eval_path=None, max_train_samples=None, max_length=1536)
    if template:
        raw["data"]["chat_template"] = template
    return raw


def test_prompt_tools_are_rendered_reported_and_previewed(tiny_model_dir, tmp_path, capsys):
    """The functions reach the rendered prompt (the system turn of chatml), in the length check, the preview
    and the export's fidelity rows; malformed tools drop the row by reason; the report line counts prompts
    and prompt tokens, says nothing is trained, and names the columns each reward reads."""
    from qlora_pipe.cli import main
    from qlora_pipe.data.prompts import prepare_prompt_data, prompt_rows, render_prompt
    from qlora_pipe.models.loading import load_tokenizer

    raw = tool_recipe(tiny_model_dir, tmp_path)
    recipe = validate_recipe(raw)
    tokenizer = load_tokenizer(recipe)
    data = prepare_prompt_data(recipe, tokenizer)
    report = data.reports[0]
    assert report.rows_kept == 5 and dict(report.dropped) == {"tools list has an entry without a function name": 1}
    rows = list(data.train)
    with_tools = [r for r in rows if r["tools"]]
    assert len(with_tools) == 4 and rows[4]["tools"] is None
    assert json.loads(rows[1]["tools"]) == TOOLS
    assert json.loads(rows[0]["tools"]) == [{"type": "function", "function": STATUTE[0]}]  # wrapped, as SFT does
    text = render_prompt(rows[1], tokenizer, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and '"name": "compute_deadline"' in text
    assert text.endswith("<|im_start|>user\nFind the statute on topic 1.<|im_end|>\n<|im_start|>assistant\n")
    plain = render_prompt(rows[4], tokenizer, tokenize=False)
    assert "find_statute" not in plain
    # the length counted is the prompt with its tools, and so is what the export's fidelity check compares
    assert report.total_tokens == sum(len(render_prompt(r, tokenizer)) for r in rows)
    assert prompt_rows(rows[:1], tokenizer)[0]["input_ids"] == render_prompt(rows[0], tokenizer)
    line = report.line()
    assert line.startswith("train: 5/6 prompts kept (dropped: 1 tools list has an entry without a function name)")
    assert f"{report.total_tokens:,} prompt tokens (none trained: the model writes the answers)" in line
    assert (
        "; 4 with tools; columns to the rewards: tools, answer; rewards read: call (tools), exact_match (answer)"
        in line
    )
    assert "trained (0%)" not in line
    saved = report.as_dict()
    assert saved["prompt_rows"] and saved["reward_columns"] == {"call": ["tools"], "exact_match": ["answer"]}

    recipe_path = tmp_path / "tools.yaml"
    recipe_path.write_text(json.dumps(raw))
    assert main(["data", str(recipe_path), "--preview", "2"]) == 0
    out = capsys.readouterr().out
    assert '"name": "find_statute"' in out and "<tools>" in out
    assert "reward call (x1): 1 if the answer is a valid call of the row's tools (listed)" in out


def test_a_template_that_cannot_render_tools_is_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    """The quickstart template renders no tools: the SFT refusal, in one line, exit 2."""
    from qlora_pipe.cli import main

    raw = tool_recipe(tiny_model_dir, tmp_path, template=None)
    recipe_path = tmp_path / "no-tools.yaml"
    recipe_path.write_text(json.dumps(raw))
    assert main(["data", str(recipe_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4 rows have tools or tool calls, but the chat template does not render them" in err[0]
    assert "set data.chat_template: chatml, llama-3 or mistral" in err[0]


def test_grpo_renders_each_prompts_tools_in_training(tiny_model_dir, tmp_path):
    """TRL's GRPOTrainer generates from each prompt rendered with its own row's tools (and a row without
    tools from the plain prompt), and a real GRPO step with the tool_call reward trains and logs it."""
    from qlora_pipe.data.prompts import render_prompt
    from qlora_pipe.methods import method_for
    from qlora_pipe.models.loading import load_tokenizer
    from qlora_pipe.runs import RunDir
    from qlora_pipe.training.method import load_policy
    from qlora_pipe.training.micro_batch import BatchChoice
    from qlora_pipe.training.stage import build_trainer, run_training

    raw = tool_recipe(tiny_model_dir, tmp_path, "render", max_steps=1)
    raw["training"].update(micro_batch_size=4, gradient_accumulation_steps=5)  # every row in one generation batch
    recipe = validate_recipe(raw)
    tokenizer = load_tokenizer(recipe)
    data = method_for(recipe).prepare_data(recipe, tokenizer)
    run = RunDir(recipe.run_dir())
    run.root.mkdir(parents=True)
    model = load_policy(recipe, tokenizer).model
    trainer = build_trainer(recipe, run, model, tokenizer, data, (), BatchChoice(4, 5))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 5  # set by Trainer's loop, read when TRL generates
    batch = next(iter(trainer.get_train_dataloader()))
    expected = {json.dumps(row["prompt"]): render_prompt(row, tokenizer) for row in data.train}
    generated = trainer._generate_and_score_completions(batch)  # TRL renders, generates and scores
    assert len(batch) == 20
    for row, ids, mask in zip(batch, generated["prompt_ids"], generated["prompt_mask"], strict=True):
        assert ids[mask.bool()].tolist() == expected[json.dumps(row["prompt"])], row["prompt"]

    result = run_training(validate_recipe(tool_recipe(tiny_model_dir, tmp_path, "trains", max_steps=1)))
    logged = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines()]
    assert any("rewards/call/mean" in row for row in logged)
    report = json.loads(result.run_dir.data_report.read_text())[0]
    assert report["prompt_rows"] and report["conversation_parts"] == {"prompts_with_tools": 4}


def test_grpo_refuses_use_vllm_in_one_line():
    """vLLM generation cannot run where this is built: the key is refused, with the reason."""
    from tests.conftest import REPO

    raw = grpo_recipe(REPO, REPO / "unused", rewards=[{"function": "json"}])
    raw["grpo"]["use_vllm"] = True
    with pytest.raises(UserError) as caught:
        validate_recipe(raw)
    message = str(caught.value)
    assert "\n" not in message and "grpo: use_vllm: vLLM generation is not supported" in message
