"""GRPO with training.micro_batch_size: auto: whole groups per step, the generation batch probed before the
step, the choice reused on resume, and `plan` choosing as training does."""

from __future__ import annotations

import json

import pytest

from qlora_pipe.errors import UserError
from qlora_pipe.recipe import validate_recipe
from tests.helpers.recipes import FORMAT, grpo_recipe


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
    from tests.helpers.crashes import CrashAtStep, SimulatedCrash

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

    from qlora_pipe.machine.hardware import with_resolved_precision
    from qlora_pipe.models.loading import DTYPES, load_tokenizer
    from qlora_pipe.plan.advice import plan_for_recipe
    from qlora_pipe.plan.grpo_terms import kv_cache_bytes
    from qlora_pipe.training import micro_batch as autobatch
    from qlora_pipe.training.method import load_policy
    from qlora_pipe.training.stage import run_training
    from tests.helpers.memory import step_peak

    recipe = auto_recipe(tiny_model_dir, tmp_path, "probe", 8, max_steps=1)
    tokenizer = load_tokenizer(recipe)
    model = load_policy(recipe, tokenizer).model
    length, new = 64, 16
    held = autobatch.try_generation(model, 8, length)
    plan = plan_for_recipe(recipe, micro_batch_size=1, max_length=length)
    # The plan is a GPU's (bf16); the probe runs in this machine's compute dtype (fp32 on an AVX2-only CPU).
    compute = DTYPES[with_resolved_precision(recipe).quantization.compute_dtype].itemsize
    batch = replace(plan.settings, micro_batch_size=8, generation_steps=1, compute_bytes=compute)
    assert held == kv_cache_bytes(plan.shape, batch)
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
    assert step_peak(lambda: autobatch.try_generation(model, 8, length)) >= step_peak(generate)

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
