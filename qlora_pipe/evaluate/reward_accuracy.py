"""Held-out reward accuracy of a preference run: does the model give the chosen answer a higher
log-probability than the rejected one, for the same prompt? And by how much (the mean margin, in nats)?

Log-probabilities are summed over each answer's tokens, end of turn included, rendered with the run's
chat template exactly as TRL renders them for training.
"""

from __future__ import annotations

from typing import Any

import torch


def answer_logprob(model, tokenizer, prompt: list[dict], answer: list[dict]) -> float:
    def ids(messages: list[dict], generation_prompt: bool) -> list[int]:
        rendered = tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
        )
        return list(rendered["input_ids"])

    start = len(ids(prompt, True))
    full = ids(prompt + answer, False)
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([full], device=device)).logits[0, :-1].float()
    targets = torch.tensor(full[1:], device=device)
    logps = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    return float(logps[start - 1 :].sum())


@torch.no_grad()
def reward_accuracy(model, tokenizer, pairs) -> dict[str, Any]:
    """Share of pairs where log p(chosen) > log p(rejected), and the mean margin."""
    was_training = model.training
    model.eval()
    try:
        margins = [
            answer_logprob(model, tokenizer, pair["prompt"], pair["chosen"])
            - answer_logprob(model, tokenizer, pair["prompt"], pair["rejected"])
            for pair in pairs
        ]
    finally:
        model.train(was_training)
    return {
        "pairs": len(margins),
        "reward_accuracy": sum(m > 0 for m in margins) / max(len(margins), 1),
        "mean_margin": sum(margins) / max(len(margins), 1),
    }
