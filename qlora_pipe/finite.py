"""Error measures where a NaN or an infinity is the worst value, never a silent pass.

Python's ``max(x, nan)`` is ``x`` (``nan > x`` is false), so a running maximum of errors forgets a NaN;
``nan <= bound`` is false but ``not nan > bound`` is true. Every check that compares a measured error
with a bound goes through these two functions.
"""

from __future__ import annotations

import math


def worst(current: float, value: float) -> float:
    """The larger of two error measures; NaN, once seen, stays (it is worse than any number)."""
    if math.isnan(current) or math.isnan(value):
        return math.nan
    return max(current, value)


def within(value: float, bound: float) -> bool:
    """value <= bound, and false for NaN and infinity whatever the bound."""
    return math.isfinite(value) and value <= bound
