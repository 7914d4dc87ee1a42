"""method: grpo (TRL's GRPOTrainer) on the same pipeline: rewards checked at validate, prompt rows checked
and reported, real GRPO steps on a tiny 4-bit model with built-in and user rewards, one-line reward
errors, held-out rewards, eval, and exact resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import validate_recipe
from tests.conftest import REPO, recipe_dict

PROMPTS_TRAIN = REPO / "data/legal-qa/grpo_train.jsonl"
PROMPTS_EVAL = REPO / "data/legal-qa/grpo_eval.jsonl"
FORMAT = r"Area: ([a-z ]+)\.?"
USER_REWARDS = '''
def mentions_area(completions, answer, **kwargs):
    """1 when the answer names the row's area anywhere."""
    return [float(a in c[0]["content"]) for c, a in zip(completions, answer)]


def broken(completions, prompts, **kwargs):
    return [1 / 0 if "offer" in p[-1]["content"] else 0.0 for p in prompts]


def text_score(completions, **kwargs):
    return ["high" for _ in completions]


def letters(completions, **kwargs):
    """Varies with the sampled text even on a random model, so the advantages are not all zero."""
    return [c[0]["content"].count("e") / 10 for c in completions]


def no_kwargs(completions):
    return [0.0 for _ in completions]
'''


def user_rewards(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def grpo_recipe(model_dir: Path, tmp_path: Path, name: str = "grpo", rewards: list | None = None, **training):
    raw = recipe_dict(model_dir, tmp_path / "runs", **training)
    raw.update(run_name=name, method="grpo")
    raw["grpo"] = {
        "num_generations": 4,
        "max_completion_length": 8,
        "beta": 0.04,
        "rewards": rewards
        or [
            {"function": "regex", "pattern": FORMAT, "name": "format", "weight": 0.5},
            {"function": "exact_match", "pattern": FORMAT, "name": "area"},
            {"function": f"{user_rewards(tmp_path)}:mentions_area"},
            {"function": "length", "max_tokens": 6, "weight": 0.1},
        ],
    }
    raw["data"].update(
        train_path=str(PROMPTS_TRAIN), eval_path=str(PROMPTS_EVAL), max_train_samples=8, max_eval_samples=4
    )
    raw["training"].update(micro_batch_size=4, gradient_accumulation_steps=1)
    return raw


def test_rewards_are_checked_at_validate(tiny_model_dir, tmp_path, capsys):
    """Bad reward entries are one-line errors from `validate` (exit 2), before any model or data loads."""
    from qlora_pipe.cli import main
    from qlora_pipe.training.reward_funcs import resolve_rewards

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
    from qlora_pipe.training.rewards import builtin_reward

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


def test_grpo_trains_with_builtin_and_user_rewards_and_records_them(tiny_model_dir, tmp_path):
    """Real GRPO steps (TRL's GRPOTrainer: sampling with transformers, the KL reference as a frozen adapter
    copy, the clipped loss) on a tiny 4-bit model; each reward's mean and spread, completion length, KL and
    the truncated share reach metrics.jsonl, and the held-out rewards before and after reach summary.json."""
    from qlora_pipe.training.stage import run_training

    result = run_training(validate_recipe(grpo_recipe(tiny_model_dir, tmp_path, max_steps=2)))
    summary = result.summary
    assert summary["method"] == "grpo" and summary["steps"] == 2
    assert summary["supervised_tokens"] > 0  # completion tokens trained on
    rows = [json.loads(line) for line in result.run_dir.metrics.read_text().splitlines()]
    logged = {key for row in rows for key in row}
    for name in ("format", "area", "mentions_area", "length"):
        assert {f"rewards/{name}/mean", f"rewards/{name}/std"} <= logged, name
    assert {"reward", "kl", "completions/mean_length", "completions/clipped_ratio", "loss"} <= logged
    held = summary["held_out_rewards"]
    assert held["before"]["prompts"] == held["after"]["prompts"] == 4
    assert set(held["after"]["rewards"]) == {"format", "area", "mentions_area", "length"}
    assert 0 <= held["after"]["fully_correct"] <= 1
    assert (result.run_dir.root / "adapter_model.safetensors").is_file()


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


def rewards_logged(run) -> list[tuple]:
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    return [(r["step"], r["reward"], r["rewards/format/mean"], r["loss"]) for r in rows if "reward" in r]


def test_grpo_resume_logs_the_same_rewards_and_ends_with_the_same_adapter(tiny_model_dir, tmp_path):
    """A run that crashes at step 3, after its step-2 checkpoint, and resumes samples the same completions (the sampler
    and the RNG state come back from the checkpoint): the same rewards and losses at every step and the same
    adapter at the end as a run that was never stopped (fp32: bit for bit)."""
    from safetensors.torch import load_file

    from qlora_pipe.training.stage import run_training
    from tests.test_resume import CrashAtStep, SimulatedCrash

    def recipe(name: str):
        rewards = [{"function": "regex", "pattern": FORMAT, "name": "format"}]
        rewards.append({"function": f"{user_rewards(tmp_path)}:letters"})
        raw = grpo_recipe(tiny_model_dir, tmp_path, name, rewards, max_steps=3, save_steps=2, logging_steps=1)
        raw["quantization"] = {"compute_dtype": "float32"}
        raw["training"]["precision"] = "fp32"
        raw["lora"]["dropout"] = 0.1  # dropout draws from the RNG too
        raw["data"]["eval_path"] = None
        return validate_recipe(raw)

    straight = run_training(recipe("straight"))
    with pytest.raises(SimulatedCrash):
        run_training(recipe("crashed"), callbacks=(CrashAtStep(3),))
    resumed = run_training(recipe("crashed"), resume=True)
    logged = rewards_logged(resumed.run_dir)
    assert [row[0] for row in logged] == [1, 2, 3]
    assert logged == rewards_logged(straight.run_dir)
    assert len({row[1] for row in logged}) > 1 and any(row[3] != 0 for row in logged)  # a comparison that can fail
    a = load_file(straight.run_dir.root / "adapter_model.safetensors")
    b = load_file(resumed.run_dir.root / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_grpo_eval_scores_base_start_and_tuned_adapters(make_recipe, tiny_model_dir, tmp_path, capsys):
    """`qlora-pipe eval` of a GRPO run that continued an SFT adapter: the base, the starting adapter and the
    tuned one on the held-out prompts; the tuned column is the run's own "after" (greedy is deterministic)."""
    from qlora_pipe.cli import main
    from qlora_pipe.training.stage import run_training

    sft = run_training(make_recipe(max_steps=2))
    raw = grpo_recipe(tiny_model_dir, tmp_path, max_steps=1)
    raw["model"]["adapter"] = str(sft.run_dir.root)
    grpo = run_training(validate_recipe(raw))
    assert main(["eval", str(grpo.run_dir.root)]) == 0
    report = json.loads(grpo.run_dir.eval_report.read_text())
    assert list(report["columns"]) == ["base", "start", "grpo"]
    assert report["columns"]["grpo"] == grpo.summary["held_out_rewards"]["after"]
    assert report["columns"]["start"] == grpo.summary["held_out_rewards"]["before"]  # the run started there
    out = capsys.readouterr().out
    assert "reward area (mean)" in out and "fully correct" in out and "held-out prompts: 4 (greedy)" in out
    # The model card names the method, the rewards and settings, and shows the eval table.
    from qlora_pipe.publish.model_card import adapter_card
    from qlora_pipe.recipe import load_recipe

    card = adapter_card(grpo.run_dir, load_recipe(grpo.run_dir.resolved_recipe), "me/grpo")
    assert "Method: GRPO on prompts (grpo_train.jsonl): rewards format (regex, weight 0.5)" in card
    assert "held-out share fully correct after training" in card and "| reward area (mean) |" in card


def test_grpo_step_peak_and_kv_cache_match_the_plan(tiny_model_dir, tmp_path):
    """The planner's GRPO terms against the real thing on CPU (fp32): one training step through TRL's GRPO
    loss on a batch TRL generated (policy forward and backward over prompt + completion, the reference
    adapter's forward), measured with the profiler's memory timeline as for SFT and DPO, within the same
    15%; micro_batch_size auto's probe of that step within 5% of it; and the KV cache of a generation
    batch, counted tensor by tensor, against the formula."""
    from dataclasses import replace

    from qlora_pipe.model import load_tokenizer
    from qlora_pipe.plan.advice import plan_for_recipe
    from qlora_pipe.plan.grpo_terms import GENERATION_TERM, kv_cache_bytes
    from qlora_pipe.runs import RunDir
    from qlora_pipe.training.method import load_policy, prepare_method_data
    from qlora_pipe.training.micro_batch import BatchChoice, try_grpo_step
    from qlora_pipe.training.stage import build_trainer
    from tests.test_plan import _step_peak

    raw = grpo_recipe(tiny_model_dir, tmp_path, "measure", max_steps=1)
    raw["quantization"] = {"compute_dtype": "float32"}
    raw["training"]["precision"] = "fp32"
    raw["data"]["eval_path"] = None
    recipe = validate_recipe(raw)
    tokenizer = load_tokenizer(recipe)
    data = prepare_method_data(recipe, tokenizer)
    model = load_policy(recipe, tokenizer).model
    run = RunDir(recipe.run_dir())
    run.root.mkdir(parents=True)
    trainer = build_trainer(recipe, run, model, tokenizer, data, (), BatchChoice(4, 1))
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, read when TRL generates
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))  # TRL generates and scores
    length = inputs["prompt_ids"].shape[1] + inputs["completion_ids"].shape[1]

    def step():
        trainer.compute_loss(model, inputs).backward()

    step()  # gradients allocated once
    model.zero_grad(set_to_none=True)
    measured = _step_peak(step)
    # micro_batch_size auto probes this step the same way (random tokens, TRL's fused LM head): the same peak
    completion = inputs["completion_ids"].shape[1]
    probed = _step_peak(lambda: try_grpo_step(model, 4, length, completion, True, recipe.grpo.temperature))
    assert abs(probed - measured) <= 0.05 * measured, (probed, measured)
    plan = plan_for_recipe(recipe, micro_batch_size=4, max_length=length)
    predicted = plan.term("activations kept") + plan.term("transient peak") + plan.term("LoRA gradients")
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)
    assert plan.term("reference adapter (GRPO)") == plan.term("LoRA weights")  # beta > 0: TRL's frozen copy
    assert GENERATION_TERM in dict(plan.terms)

    prompt = inputs["prompt_ids"][:2]
    out = model.generate(
        input_ids=prompt,
        attention_mask=inputs["prompt_mask"][:2],
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    cache = out.past_key_values
    counted = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    settings = replace(plan.settings, micro_batch_size=2, generation_steps=1, max_length=prompt.shape[1] + 5)
    assert counted == kv_cache_bytes(plan.shape, settings)  # the last token generated is never cached


def test_a_grpo_run_exports_and_verifies_like_any_run(tiny_model_dir, tmp_path):
    """The merged model of a GRPO run against the trained adapter on the run's own prompts (rendered for
    generation, every token compared): the export's fidelity check passes."""
    from qlora_pipe.export.command import export_merged
    from qlora_pipe.training.stage import run_training

    grpo = run_training(validate_recipe(grpo_recipe(tiny_model_dir, tmp_path, max_steps=1)))
    exported = export_merged(grpo.run_dir.root)
    assert exported.fidelity["passed"] and exported.fidelity["examples"] == 8


def test_prompt_rows_are_checked_dropped_by_reason_and_previewed(tiny_model_dir, tmp_path, capsys):
    """Prompt rows: a string or a conversation ending with the user; the columns the rewards read present;
    room left in data.max_length to generate. Dropped rows are counted by reason; `data --preview` shows
    the prompt as rendered and what each reward reads."""
    from qlora_pipe.cli import main
    from qlora_pipe.data.prompts import prepare_prompt_data
    from qlora_pipe.model import load_tokenizer
    from tests.data_helpers import write_jsonl

    rows = [
        {"prompt": "What is an offer?", "answer": "contracts", "source": {"page": 3}},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tort?"}], "answer": "x"},
        {"question": "no prompt column", "answer": "torts"},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "answer": "x"},
        {"prompt": "What is a tort?"},
        {"prompt": "word " * 300, "answer": "torts"},
    ]
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, rows)
    raw = grpo_recipe(tiny_model_dir, tmp_path, rewards=[{"function": "exact_match", "name": "area"}])
    raw["data"].update(train_path=str(path), eval_path=None, max_length=128, max_train_samples=None)
    recipe = validate_recipe(raw)
    data = prepare_prompt_data(recipe, load_tokenizer(recipe))
    report = data.reports[0]
    assert report.rows_kept == 2 and data.held_out_prompts is None
    assert dict(report.dropped) == {
        "no prompt column": 1,
        "the prompt does not end with a non-empty user turn": 1,
        "no answer column (reward area reads it)": 1,
        "prompt longer than data.max_length - grpo.max_completion_length (120 tokens)": 1,
    }
    first = data.train[0]
    assert first["prompt"] == [{"role": "user", "content": "What is an offer?"}]
    assert json.loads(first["source"]) == {"page": 3}  # objects reach the rewards as JSON text
    recipe_path = tmp_path / "prompts.yaml"
    recipe_path.write_text(json.dumps(raw))
    assert main(["data", str(recipe_path), "--preview", "2"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>user\nWhat is an offer?<|im_end|>\n<|im_start|>assistant\n" in out
    assert "reward area (x1): exact_match of the whole answer against answer = 'contracts'" in out


@pytest.mark.skipif(
    os.environ.get("QLORA_PIPE_SLOW_TESTS") != "1" or not Path("models/quickstart-base/config.json").is_file(),
    reason="trains the bundled GRPO example (about 10 minutes): set QLORA_PIPE_SLOW_TESTS=1 after building the base",
)
def test_bundled_grpo_example_raises_the_held_out_reward(tmp_path):
    from qlora_pipe.recipe import load_recipe
    from qlora_pipe.training.stage import run_training

    warmup = run_training(load_recipe("recipes/quickstart-grpo-warmup.yaml", [f"output_dir={tmp_path}"]))
    recipe = load_recipe(
        "recipes/quickstart-grpo.yaml", [f"output_dir={tmp_path}", f"model.adapter={warmup.run_dir.root}"]
    )
    held = run_training(recipe).summary["held_out_rewards"]
    # measured on a 2-core AMD EPYC (fp32): format 0.0% -> 97.8%, weighted reward 0.000 -> 0.711 (docs/grpo.md);
    # other CPUs sample differently, so the bars are lower
    before, after = held["before"], held["after"]
    assert after["rewards"]["format"] >= before["rewards"]["format"] + 0.5
    assert after["weighted_reward"] >= before["weighted_reward"] + 0.35


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


def test_grpo_auto_micro_batch_divides_the_completions_per_step():
    """micro_batch_size auto for GRPO backs off over the sizes that divide the completions per step, so micro
    batch x accumulation is exactly that many whole groups (TRL's generation batch); a count that is not a
    multiple of num_generations is refused in one line."""
    import torch

    from qlora_pipe.recipe.grpo import GrpoSection, grpo_refusal
    from qlora_pipe.training.micro_batch import find_micro_batch, largest_divisor

    tried = []

    def probe(size: int) -> None:
        tried.append(size)
        if size > 4:
            raise torch.OutOfMemoryError("simulated")

    assert find_micro_batch(probe, 16, 1, lambda n: largest_divisor(12, n)) == 3
    assert tried == [12, 6, 3]
    grpo = GrpoSection(rewards=[{"function": "json"}], num_generations=4)
    assert grpo_refusal("grpo", grpo, "auto", 1, 12) is None
    refusal = grpo_refusal("grpo", grpo, "auto", 1, 6)
    assert (
        refusal
        and "6 completions per step with micro_batch_size auto must be a multiple of grpo.num_generations (4)"
        in refusal
    )


def auto_recipe(tiny_model_dir, tmp_path, name: str, effective: int, **training):
    raw = grpo_recipe(
        tiny_model_dir, tmp_path, name, [{"function": "regex", "pattern": FORMAT, "name": "format"}], **training
    )
    raw["training"].update(micro_batch_size="auto", effective_batch_size=effective)
    raw["data"]["eval_path"] = None
    return validate_recipe(raw)


def test_grpo_auto_micro_batch_probes_generation_then_the_step_and_is_reused_on_resume(
    tiny_model_dir, tmp_path, monkeypatch
):
    """A real GRPO run with micro_batch_size auto: the generation phase is probed once at the whole generation
    batch (8 completions x data.max_length, real), then the training step backs off (out of memory simulated
    above 2 completions, real passes otherwise); the choice (2 x 4 = 8 completions, 2 prompts of 4) is
    recorded, trains, and a resumed run reuses it without probing."""
    import torch

    from qlora_pipe.training import micro_batch as autobatch
    from qlora_pipe.training.stage import run_training
    from tests.test_resume import CrashAtStep, SimulatedCrash

    real_step, real_generation = autobatch.try_grpo_step, autobatch.try_generation
    probed, generated = [], []

    def limited_memory(model, size, length, *args):
        probed.append(size)
        if size > 2:  # this "card" fits two sequences of max_length in a training step
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        real_step(model, size, length, *args)

    def generation(model, completions, length):
        generated.append((completions, length))
        return real_generation(model, completions, length)

    monkeypatch.setattr(autobatch, "try_grpo_step", limited_memory)
    monkeypatch.setattr(autobatch, "try_generation", generation)
    recipe = auto_recipe(tiny_model_dir, tmp_path, "auto", 8, max_steps=3, save_steps=2)
    with pytest.raises(SimulatedCrash):
        run_training(recipe, callbacks=(CrashAtStep(3),))
    assert generated == [(8, recipe.data.max_length)] and probed == [8, 4, 2]
    recorded = json.loads((recipe.run_dir() / "auto_batch.json").read_text())
    assert recorded == {"micro_batch_size": 2, "gradient_accumulation_steps": 4}

    probed.clear()
    generated.clear()
    result = run_training(recipe, resume=True)
    assert probed == [] and generated == []  # the recorded choice is reused, not probed again
    assert (result.summary["micro_batch_size"], result.summary["gradient_accumulation_steps"]) == (2, 4)
    assert result.summary["steps"] == 3


def test_grpo_auto_generation_probe_holds_the_planned_kv_cache_and_refuses_what_cannot_fit(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The generation probe really holds the KV cache the planner counts for the generation batch (every
    completion at data.max_length) and peaks above a real sampling of that batch (profiler's memory
    timeline, CPU); a generation batch that does not fit stops the run in one line naming what to lower,
    and completions per step that are not whole groups are refused before any probe."""
    from dataclasses import replace

    import torch

    from qlora_pipe.model import load_tokenizer
    from qlora_pipe.plan.advice import plan_for_recipe
    from qlora_pipe.plan.grpo_terms import kv_cache_bytes
    from qlora_pipe.training import micro_batch as autobatch
    from qlora_pipe.training.method import load_policy
    from qlora_pipe.training.stage import run_training
    from tests.test_plan import _step_peak

    recipe = auto_recipe(tiny_model_dir, tmp_path, "probe", 8, max_steps=1)
    tokenizer = load_tokenizer(recipe)
    model = load_policy(recipe, tokenizer).model
    length, new = 64, 16
    held = autobatch.try_generation(model, 8, length)
    plan = plan_for_recipe(recipe, micro_batch_size=1, max_length=length)
    assert held == kv_cache_bytes(plan.shape, replace(plan.settings, micro_batch_size=8, generation_steps=1))
    # an upper bound of the real thing: sampling 8 completions of 16 tokens after 48-token prompts
    ids = torch.randint(0, model.config.vocab_size, (8, length - new))

    def generate() -> None:
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=True,
                pad_token_id=tokenizer.pad_token_id,
            )

    model.eval()
    assert _step_peak(lambda: autobatch.try_generation(model, 8, length)) >= _step_peak(generate)

    def no_room(model, completions, length):
        raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    monkeypatch.setattr(autobatch, "try_generation", no_room)
    with pytest.raises(UserError) as caught:
        run_training(auto_recipe(tiny_model_dir, tmp_path, "too-big", 8, max_steps=1))
    assert "generating a step's 8 completions at once" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(UserError, match=r"6 completions per step .* multiple of grpo.num_generations \(4\)"):
        run_training(auto_recipe(tiny_model_dir, tmp_path, "groups", 6, max_steps=1))


def test_plan_of_grpo_auto_picks_whole_groups_like_training(tiny_model_dir, tmp_path):
    """`plan` on a GRPO recipe with micro_batch_size auto: a micro batch that divides the completions per step,
    the generation batch all of them (never a micro batch above the completions, as before)."""
    from dataclasses import replace

    from qlora_pipe.plan.advice import recipe_plan
    from qlora_pipe.plan.grpo_terms import generation_batch
    from qlora_pipe.plan.terms import plan_memory

    raw = grpo_recipe(tiny_model_dir, tmp_path)
    raw["training"].update(micro_batch_size="auto", effective_batch_size=8)
    recipe = validate_recipe(raw)
    roomy = recipe_plan(recipe, budget=64 * 2**30)
    assert roomy.settings.micro_batch_size == 8 and generation_batch(roomy.settings) == 8
    one = recipe_plan(recipe, budget=None)
    assert one.settings.micro_batch_size == 1 and generation_batch(one.settings) == 8
    # A budget between the plans of micro batch 2 and 4 (each sampling all 8) picks 2: 4 does not fit, 3 does not
    # divide 8.
    two, four = (
        plan_memory(one.shape, replace(one.settings, micro_batch_size=b, generation_steps=8 // b)) for b in (2, 4)
    )
    assert two.total < four.total
    tight = recipe_plan(recipe, budget=(two.total + four.total) // 2)
    assert tight.settings.micro_batch_size == 2 and generation_batch(tight.settings) == 8
