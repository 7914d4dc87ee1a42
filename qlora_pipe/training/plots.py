"""The loss-curve image of a run, drawn from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics: Path, out: Path, title: str) -> Path | None:
    """Train and eval loss against the optimizer step; None when nothing was logged."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    train, evals, rewards = (_points(rows, key) for key in ("loss", "eval_loss", "reward"))
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.5)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", linewidth=1.5)
    if rewards:  # GRPO: its loss hovers near 0 by construction; the reward is the curve that says it learns
        twin = ax.twinx()
        twin.plot(*zip(*rewards, strict=True), color="tab:green", label="reward (mean)", linewidth=1.5)
        twin.set_ylabel("reward")
        twin.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


def _points(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) where the value was logged; null where it had none (a GRPO step no reward applied to)."""
    return [(r["step"], r[key]) for r in rows if r.get(key) is not None]
