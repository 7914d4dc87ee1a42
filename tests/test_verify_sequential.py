"""Verification loads the trained and the merged model one after the other (the trained model's logits kept on
disk in between), gives the same numbers as holding both, and is planned as the larger of the two."""

from __future__ import annotations

import gc

import torch

from qlora_pipe.export.verify_memory import LOGITS, MERGED, TRAINED, verification_peak


def alive_4bit_layers() -> int:
    import bitsandbytes as bnb

    return sum(isinstance(obj, bnb.nn.Linear4bit) for obj in gc.get_objects())


def test_the_merged_model_loads_after_the_trained_one_is_gone_with_the_same_numbers(make_recipe):
    from qlora_pipe.export.command import export_merged
    from qlora_pipe.export.fidelity import compare, served_model, verification_rows, verify_served
    from qlora_pipe.models.loading import load_trained_model
    from qlora_pipe.recipe import load_recipe
    from qlora_pipe.training.stage import run_training

    result = run_training(make_recipe(max_steps=2))
    run = result.run_dir
    del result
    merged = export_merged(run.root, verify=False).out
    recipe = load_recipe(run.resolved_recipe)
    seen = []

    def load_served():
        gc.collect()
        seen.append(alive_4bit_layers())  # the trained model's 4-bit layers, if it were still alive
        return served_model(merged, torch.float32)

    gc.collect()
    before = alive_4bit_layers()  # the training's model, if a library still holds it
    sequential = verify_served(recipe, run, load_served, limit=4)
    assert seen == [before]  # none of the trained model verification loaded is alive any more
    assert not list(run.root.glob(".verify-logits-*"))  # the stored logits are removed

    rows, _ = verification_rows(recipe, run, 4)
    together = compare(load_trained_model(recipe, run.root), served_model(merged, torch.float32), rows)
    for key in ("eval_loss_trained", "eval_loss_merged", "max_abs_logit_diff", "top1_agreement"):
        assert sequential[key] == together[key], key


def test_verification_is_planned_as_the_larger_stage_not_the_sum():
    gib = 2**30
    need = {TRAINED: 5 * gib, MERGED: 14 * gib, LOGITS: 1 * gib}  # a 7B: 4-bit + adapter, bf16 merged
    assert verification_peak(need, noise_copy=False) == int(15 * gib * 1.1)
    assert verification_peak(need, noise_copy=True) == int(15 * gib * 1.1)  # 2 x 5 GiB is still below 14
    need[TRAINED] = 8 * gib
    assert verification_peak(need, noise_copy=True) == int(17 * gib * 1.1)
