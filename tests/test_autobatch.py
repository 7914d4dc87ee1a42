"""`micro_batch_size: auto`: OOM back-off keeps the effective batch and is reused on resume."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_pipe.errors import UserError
from qlora_pipe.training import micro_batch as autobatch
from qlora_pipe.training.micro_batch import find_micro_batch
from qlora_pipe.training.stage import run_training
from tests.helpers.crashes import CrashAtStep, SimulatedCrash


def test_back_off_halves_until_it_fits():
    tried = []

    def probe(size):
        tried.append(size)
        if size > 3:
            raise torch.OutOfMemoryError("simulated")

    assert find_micro_batch(probe, 16) == 2
    assert tried == [16, 8, 4, 2]
    with pytest.raises(UserError, match="even a micro batch of 1 runs out of memory"):
        find_micro_batch(lambda size: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated")), 4)


def test_auto_micro_batch_in_a_real_run_and_on_resume(make_recipe, monkeypatch):
    real = autobatch.try_micro_batch
    probed = []

    def limited_memory(model, size, length):
        probed.append(size)
        if size > 2:  # this "card" fits two sequences of max_length
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        real(model, size, length)  # the real forward and backward pass

    monkeypatch.setattr(autobatch, "try_micro_batch", limited_memory)
    recipe = make_recipe(max_steps=4, save_steps=2, micro_batch_size="auto", effective_batch_size=8)
    with pytest.raises(SimulatedCrash):
        run_training(recipe, callbacks=(CrashAtStep(3),))
    assert probed == [16, 8, 4, 2]
    recorded = json.loads((recipe.run_dir() / "auto_batch.json").read_text())
    assert recorded == {"micro_batch_size": 2, "gradient_accumulation_steps": 4}

    probed.clear()
    result = run_training(recipe, resume=True)
    assert probed == []  # the recorded choice is reused, not probed again
    assert (result.summary["micro_batch_size"], result.summary["gradient_accumulation_steps"]) == (2, 4)
    assert result.summary["steps"] == 4
