"""Greedy answers to a few questions, rendered with the model's own chat template."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], system: str | None, max_new_tokens: int) -> list[str]:
    """One greedy answer per prompt; generation stops at the tokenizer's EOS (end of turn)."""
    was_training = model.training
    model.eval()
    answers = []
    try:
        for prompt in prompts:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            inputs = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            ).to(model.device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[0, inputs["input_ids"].shape[1] :]
            answers.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers
