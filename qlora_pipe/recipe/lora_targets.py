"""Which layers ``lora.target_modules`` names: one rule for the model stage and the planner, PEFT's own for
a list of names (a layer matches a target equal to its qualified name or to its last dotted parts)."""

from __future__ import annotations


def is_target(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def unmatched_targets(names: list[str], targets: list[str]) -> list[str]:
    """The targets that match none of the layer names (each one a user error before any training)."""
    return [t for t in targets if not any(is_target(n, [t]) for n in names)]
