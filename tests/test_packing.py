"""Packing: rows packed into max_length sequences (TRL best-fit-decreasing, padding-free),
with no attention across row boundaries."""

from __future__ import annotations

import torch

from qlora_pipe.data.prepare import prepare_data
from qlora_pipe.data.prepared import IGNORE
from qlora_pipe.models.loading import load_tokenizer, load_trainable_model
from qlora_pipe.runs import RunDir
from qlora_pipe.training.stage import build_trainer


def test_packed_batches_keep_rows_apart(make_recipe, tmp_path):
    recipe = make_recipe(micro_batch_size=2)
    recipe.data.packing = True
    recipe.data.max_length = 512
    recipe.quantization.compute_dtype = "float32"
    tokenizer = load_tokenizer(recipe)
    data = prepare_data(recipe.data, tokenizer, recipe.seed)
    _, trainable = load_trainable_model(recipe, tokenizer)
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    trainer = build_trainer(recipe, run, trainable.model, tokenizer, data)
    packed = trainer.train_dataset
    assert len(packed) < len(data.train)  # 32 rows of ~170 tokens fit in fewer 512-token sequences
    assert sum(len(row["input_ids"]) for row in packed) == sum(len(row["input_ids"]) for row in data.train)

    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and "position_ids" in batch  # padding-free
    positions = batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert len(starts) >= 2
    model = trainable.model.eval()
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        second = slice(starts[1], starts[2] if len(starts) > 2 else len(positions))
        alone = model(input_ids=batch["input_ids"][:, second]).logits[0]
    # The second row sees only itself: same logits as when run on its own.
    torch.testing.assert_close(packed_logits[second], alone, atol=1e-4, rtol=1e-4)
    # Its first token is never trained as a continuation of the previous row.
    assert batch["labels"][0, starts[1]] == IGNORE


def test_training_with_packing_runs_and_learns(make_recipe):
    from qlora_pipe.training.stage import run_training

    recipe = make_recipe(max_steps=6, micro_batch_size=2)
    recipe.data.packing = True
    result = run_training(recipe)
    assert result.summary["final_eval_loss"] < result.summary["eval_loss_before"]
