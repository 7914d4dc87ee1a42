"""Held-out reward accuracy of a preference run: does the model give the chosen answer a higher
log-probability than the rejected one, for the same prompt? And by how much (the mean margin, in nats)?

KTO's unpaired rows (prompt, completion, label) have no rejected twin, so they get the label separation
instead: each completion's mean log-probability per token, and the share of (desirable, undesirable)
row combinations where the desirable one scores higher (an AUC: 0.5 is chance, 1.0 perfect separation).

Log-probabilities are summed over each answer's tokens, end of turn included, rendered with the run's
chat template exactly as TRL renders them for training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def answer_logprob(model, tokenizer, prompt: list[dict], answer: list[dict], per_token: bool = False) -> float:
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
    answer_logps = logps[start - 1 :]
    return float(answer_logps.mean() if per_token else answer_logps.sum())


@contextmanager
def evaluating(model) -> Iterator:
    """The model in eval mode without gradients, put back as it was."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def reward_accuracy(model, tokenizer, pairs) -> dict[str, Any]:
    """Share of pairs where log p(chosen) > log p(rejected), and the mean margin."""
    with evaluating(model):
        margins = [
            answer_logprob(model, tokenizer, pair["prompt"], pair["chosen"])
            - answer_logprob(model, tokenizer, pair["prompt"], pair["rejected"])
            for pair in pairs
        ]
    return {
        "pairs": len(margins),
        "reward_accuracy": sum(m > 0 for m in margins) / max(len(margins), 1),
        "mean_margin": sum(margins) / max(len(margins), 1),
    }


def label_separation(model, tokenizer, rows) -> dict[str, Any]:
    """KTO rows: mean log-prob per token of desirable and undesirable completions, and the label AUC."""
    with evaluating(model):
        scored = [
            (answer_logprob(model, tokenizer, row["prompt"], row["completion"], per_token=True), row["label"])
            for row in rows
        ]
    good = [score for score, label in scored if label]
    bad = [score for score, label in scored if not label]
    wins = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return {
        "rows": len(scored),
        "desirable": len(good),
        "undesirable": len(bad),
        "label_auc": wins / max(len(good) * len(bad), 1),
        "desirable_logprob": mean(good),
        "undesirable_logprob": mean(bad),
    }


def held_out_scores(model, tokenizer, rows) -> dict[str, Any]:
    """Reward accuracy for pairs, label separation for KTO's unpaired rows."""
    if len(rows) and "completion" in rows[0]:
        return label_separation(model, tokenizer, rows)
    return reward_accuracy(model, tokenizer, rows)
