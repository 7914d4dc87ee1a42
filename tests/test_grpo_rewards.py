"""GRPO's rewards: entries checked at validate (before torch is imported), the built-in rewards' scores, and a
reward that fails stopping the run in one line naming the reward and the row."""

from __future__ import annotations

import json
import logging

import pytest

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import validate_recipe
from tests.conftest import REPO
from tests.helpers.recipes import FORMAT, grpo_recipe, user_rewards


def test_rewards_are_checked_at_validate(tiny_model_dir, tmp_path, capsys):
    """Bad reward entries are one-line errors from `validate` (exit 2), before any model or data loads."""
    from qlora_pipe.cli import main
    from qlora_pipe.rewards.functions import resolve_rewards

    path = user_rewards(tmp_path)

    def problem(rewards: list, **grpo) -> str:
        raw = grpo_recipe(tiny_model_dir, tmp_path, rewards=rewards)
        raw["grpo"].update(grpo)
        with pytest.raises(UserError) as caught:
            resolve_rewards(validate_recipe(raw))
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert "needs a pattern" in problem([{"function": "regex"}])
    assert "not a valid regular expression" in problem([{"function": "regex", "pattern": "(unclosed"}])
    assert "needs max_tokens" in problem([{"function": "length"}])
    assert "not a built-in" in problem([{"function": "exactmatch"}])
    assert "only exact_match and token_f1" in problem([{"function": "json", "column": "answer"}])
    assert "two rewards named 'json'" in problem([{"function": "json"}, {"function": "json"}])
    assert "file nowhere.py not found" in problem([{"function": "nowhere.py:f"}])
    assert "module no_such_module_xyz not found" in problem([{"function": "no_such_module_xyz:f"}])
    assert f"{path} has no function missing" in problem([{"function": f"{path}:missing"}])
    assert "must accept **kwargs" in problem([{"function": f"{path}:no_kwargs"}])
    assert "multiple of grpo.num_generations (3)" in problem([{"function": "json"}], num_generations=3)
    raw = grpo_recipe(tiny_model_dir, tmp_path, rewards=[{"function": "json"}])
    raw["training"].update(micro_batch_size="auto", effective_batch_size=6)
    raw["grpo"]["num_generations"] = 4
    with pytest.raises(UserError, match=r"6 completions per step with micro_batch_size auto must be a multiple"):
        validate_recipe(raw)  # at validate, before the model loads
    raw = grpo_recipe(tiny_model_dir, tmp_path, rewards=[{"function": "json"}])
    raw["method"] = "sft"
    with pytest.raises(UserError, match="other methods take none"):
        validate_recipe(raw)
    # The CLI: exit 2 and one line naming the reward.
    raw = grpo_recipe(tiny_model_dir, tmp_path, rewards=[{"function": f"{path}:missing"}])
    recipe_path = tmp_path / "bad.yaml"
    recipe_path.write_text(json.dumps(raw))
    assert main(["validate", str(recipe_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grpo.rewards.0.function" in err[0] and "no function missing" in err[0]


def test_builtin_rewards_score_what_they_say():
    from qlora_pipe.recipe.grpo import RewardSection
    from qlora_pipe.rewards.builtin import builtin_reward

    def score(spec: dict, texts: list[str], **columns) -> list[float]:
        completions = [[{"role": "assistant", "content": t}] for t in texts]
        ids = [list(range(len(t.split()))) for t in texts]
        return builtin_reward(RewardSection(**spec))(completions=completions, completion_ids=ids, **columns)

    area = {"function": "exact_match", "pattern": FORMAT}
    assert score(area, ["Area: torts.", "Area: contracts", "torts"], answer=["torts"] * 3) == [1.0, 0.0, 0.0]
    f1 = score({"function": "token_f1"}, ["a binding promise", "nothing"], answer=["a binding agreement"] * 2)
    assert f1[0] == pytest.approx(0.5) and f1[1] == 0.0
    assert score({"function": "regex", "pattern": FORMAT}, ["Area: torts", "Area: torts, I think"]) == [1.0, 0.0]
    assert score({"function": "json"}, ['{"a": 1}', "```json\n[1, 2]\n```", "{'a': 1}"]) == [1.0, 1.0, 0.0]
    tools = json.dumps([{"type": "function", "function": {"name": "lookup", "parameters": {"required": ["term"]}}}])
    calls = ['<tool_call>{"name": "lookup", "arguments": {"term": "tort"}}</tool_call>', '{"name": "lookup"}', "no"]
    assert score({"function": "tool_call"}, calls, tools=[tools] * 3) == [1.0, 0.0, 0.0]
    parsed = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "lookup", "arguments": {}}}]}
    reward = builtin_reward(RewardSection(function="tool_call"))  # TRL parsed the call out of the text
    assert reward(completions=[[parsed]], completion_ids=[[1]], tools=[tools]) == [0.0]  # a required argument missing
    parsed["tool_calls"][0]["function"]["arguments"] = {"term": "tort"}
    assert reward(completions=[[parsed]], completion_ids=[[1]], tools=[tools]) == [1.0]
    assert score({"function": "length", "max_tokens": 2}, ["one two", "one two three four"]) == [0.0, -1.0]


def test_a_reward_that_fails_stops_the_run_in_one_line_naming_reward_and_row(tiny_model_dir, tmp_path, capsys):
    """A user reward that raises, or returns a non-number, stops `train` with exit 2 and one line naming the
    reward and the prompt row; the run is marked failed."""
    from qlora_pipe.cli import main
    from qlora_pipe.runs import RunDir

    path = user_rewards(tmp_path)
    for name, expected in (("broken", "raised ZeroDivisionError: division by zero"), ("text_score", "returned str")):
        raw = grpo_recipe(tiny_model_dir, tmp_path, name, rewards=[{"function": f"{path}:{name}"}], max_steps=1)
        raw["data"].update(max_train_samples=1, eval_path=None)  # row 1: "What is an offer?"
        recipe_path = tmp_path / f"{name}.yaml"
        recipe_path.write_text(json.dumps(raw))
        assert main(["train", str(recipe_path)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        line = err.strip().splitlines()[-1]  # the lines above it are progress bars
        assert f"reward {name} ({path}:{name}) {expected}" in line
        assert "on training prompt 1 ('..." in line and "Question: What is an offer?')" in line
        assert RunDir(tmp_path / "runs" / name).state() == "failed"


def test_validating_a_grpo_recipe_checks_its_rewards_without_torch():
    """`validate` resolves the rewards (built-ins made, user functions imported) and stays instant."""
    import subprocess
    import sys

    code = (
        "import sys; from qlora_pipe.cli import main; assert main(['validate', 'recipes/quickstart-grpo.yaml']) == 0; "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'trl') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_reward_that_applies_to_no_row_shows_n_a_and_training_goes_on(
    tiny_model_dir, tmp_path, capsys, caplog, monkeypatch
):
    """A reward returning None (not applicable, as TRL allows) for every row of a step: training goes on; the
    progress line shows n/a, metrics.jsonl records null, loss.png is drawn, the held-out rewards are None
    (not 0, not "fully correct") in the summary and the model card, and no library warning is shown."""
    from qlora_pipe.cli import main
    from qlora_pipe.publish.model_card import adapter_card
    from qlora_pipe.recipe import load_recipe
    from qlora_pipe.runs import RunDir

    caplog.set_level(logging.INFO)
    monkeypatch.setenv("QLORA_PIPE_PROGRESS_SECONDS", "0")  # a progress line at every step
    path = tmp_path / "na_rewards.py"
    path.write_text("def not_applicable(completions, **kwargs):\n    return [None for _ in completions]\n")
    raw = grpo_recipe(tiny_model_dir, tmp_path, "na", rewards=[{"function": f"{path}:not_applicable"}], max_steps=2)
    raw["training"]["logging_steps"] = 1
    recipe_path = tmp_path / "na.yaml"
    recipe_path.write_text(json.dumps(raw))
    assert main(["train", str(recipe_path)]) == 0
    err = capsys.readouterr().err
    logged = err + caplog.text
    assert "Traceback" not in err and "All reward functions returned None" not in logged
    assert "attempting to log a value" not in logged  # TensorBoard's callback on a None metric
    progress = [line for line in err.splitlines() if line.startswith("training") and "2/2" in line]
    assert progress and "not_applicable=n/a" in progress[-1] and "reward=n/a" in progress[-1]
    run = tmp_path / "runs" / "na"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "rewards/not_applicable/mean" in r]
    assert len(logged) == 2 and all(r["rewards/not_applicable/mean"] is None and r["reward"] is None for r in logged)
    assert (run / "loss.png").is_file()
    after = json.loads((run / "summary.json").read_text())["held_out_rewards"]["after"]
    assert after["prompts"] == 4 and after["rewards"] == {"not_applicable": None}
    assert after["weighted_reward"] is None and after["fully_correct"] is None
    card = adapter_card(RunDir(run), load_recipe(recipe_path), "user/na")
    assert "| held-out share fully correct after training | n/a (weighted reward n/a) |" in card
