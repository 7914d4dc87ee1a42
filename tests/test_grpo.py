"""method: grpo (TRL's GRPOTrainer) on the same pipeline: rewards checked at validate, prompt rows checked
and reported, real GRPO steps on a tiny 4-bit model with built-in and user rewards, one-line reward
errors, held-out rewards, eval, and exact resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qlora_pipe.recipe import validate_recipe
from tests.helpers.recipes import FORMAT, grpo_recipe, user_rewards


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


def rewards_logged(run) -> list[tuple]:
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    return [(r["step"], r["reward"], r["rewards/format/mean"], r["loss"]) for r in rows if "reward" in r]


def test_grpo_resume_logs_the_same_rewards_and_ends_with_the_same_adapter(tiny_model_dir, tmp_path):
    """A run that crashes at step 3, after its step-2 checkpoint, and resumes samples the same completions (the sampler
    and the RNG state come back from the checkpoint): the same rewards and losses at every step and the same
    adapter at the end as a run that was never stopped (fp32: bit for bit)."""
    from safetensors.torch import load_file

    from qlora_pipe.training.stage import run_training
    from tests.helpers.crashes import CrashAtStep, SimulatedCrash

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

    from qlora_pipe.methods import method_for
    from qlora_pipe.models.loading import load_tokenizer
    from qlora_pipe.plan.advice import plan_for_recipe
    from qlora_pipe.plan.grpo_terms import GENERATION_TERM, kv_cache_bytes
    from qlora_pipe.runs import RunDir
    from qlora_pipe.training.method import load_policy
    from qlora_pipe.training.micro_batch import BatchChoice, try_grpo_step
    from qlora_pipe.training.stage import build_trainer
    from tests.helpers.memory import step_peak

    raw = grpo_recipe(tiny_model_dir, tmp_path, "measure", max_steps=1)
    raw["quantization"] = {"compute_dtype": "float32"}
    raw["training"]["precision"] = "fp32"
    raw["data"]["eval_path"] = None
    recipe = validate_recipe(raw)
    tokenizer = load_tokenizer(recipe)
    data = method_for(recipe).prepare_data(recipe, tokenizer)
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
    measured = step_peak(step)
    # micro_batch_size auto probes this step the same way (random tokens, TRL's fused LM head): the same peak
    completion = inputs["completion_ids"].shape[1]
    probed = step_peak(lambda: try_grpo_step(model, 4, length, completion, True, recipe.grpo.temperature))
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
    from qlora_pipe.models.loading import load_tokenizer
    from tests.helpers.data import write_jsonl

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
