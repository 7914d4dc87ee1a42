"""Losses without full-vocabulary logits, against the plain computation on a real 4-bit model with LoRA.

SFT, DPO, KTO and GRPO score tokens with TRL's fused LM head (tiles of 4,096 tokens x 32,768 entries of the
vocabulary); ORPO with the same head through compat/trl.py. Each gives the loss and gradients the full logits give.
"""

from __future__ import annotations

import pytest
import torch
from conftest import recipe_dict

from qlora_pipe.recipe import validate_recipe


def _trainable(model_dir, tmp_path):
    from qlora_pipe.models.loading import add_lora, load_base_model

    raw = recipe_dict(model_dir, tmp_path / "runs", precision="fp32")
    recipe = validate_recipe(raw)
    model = add_lora(load_base_model(recipe, torch.device("cpu")), recipe).model.train()
    torch.manual_seed(1)
    for param in model.parameters():  # LoRA B starts at zero: give every adapter weight a gradient
        if param.requires_grad:
            param.data.normal_(0, 0.05)
    return model


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(first: dict, second: dict) -> None:
    assert first.keys() == second.keys() and first
    for name, grad in first.items():
        torch.testing.assert_close(second[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_lm_head_gives_the_full_logits_loss_and_gradients(tiny_model_dir, tmp_path):
    """The head SFT, DPO, KTO and GRPO train through, with tiles smaller than the sequence and the vocabulary."""
    from trl.trainer.utils import add_fused_lm_head

    from qlora_pipe.compat.trl import loss_token_tile

    model = _trainable(tiny_model_dir, tmp_path)
    add_fused_lm_head(model.get_base_model())
    ids = torch.randint(0, model.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :20] = -100  # a prompt: not scored
    plain = model(input_ids=ids, labels=labels).loss
    plain_grads = _grads(model, plain)
    with loss_token_tile(32):  # 190 scored positions: six tiles
        fused = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
        fused_grads = _grads(model, fused)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    _assert_same(plain_grads, fused_grads)


def test_orpo_chunked_forward_equals_trls(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from qlora_pipe.compat.trl import orpo_config, orpo_trainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    rows = [
        {"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.", "rejected": f" Maybe {i}."}
        for i in range(4)
    ]
    model = _trainable(tiny_model_dir, tmp_path)
    config = orpo_config()(
        output_dir=str(tmp_path / "orpo"), per_device_train_batch_size=4, max_length=64, report_to=[], use_cpu=True
    )
    trainer_class = orpo_trainer()
    trainer = trainer_class(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    chunked = trainer.concatenated_forward(trainer.model, batch)
    plain = trainer_class.__mro__[1].concatenated_forward(trainer, trainer.model, batch)  # TRL's own ORPO
    for ours, theirs in zip(chunked[:2], plain[:2], strict=True):  # chosen and rejected mean log-probabilities
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert chunked[4].item() == pytest.approx(plain[4].item(), rel=1e-5)  # the chosen NLL
    assert chunked[2].dim() == 1 and chunked[2].numel() > 0  # mean logits of the attended positions

    def orpo_terms(out):  # the NLL and both log-probabilities, so every output's gradient path is checked
        return out[4] - out[0].sum() + out[1].sum()

    model = trainer.model
    plain_grads = _grads(model, orpo_terms(plain))
    _assert_same(plain_grads, _grads(model, orpo_terms(trainer.concatenated_forward(model, batch))))
