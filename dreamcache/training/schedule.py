"""The learning rate along a training stage: constant (the paper's), or falling along half a cosine.

A stage ends at its step count or at its time budget, whichever comes first, so its progress is the
larger of the two fractions. The cosine ends at a tenth of the rate rather than at zero: the last
steps still learn, and a later session that continues the weights starts again at the full rate (a
warm restart), which is how several sessions' device time adds up to one model.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")
FLOOR = 0.1  # the cosine's end, as a share of the learning rate


def stage_progress(step: int, steps: int, seconds: float = 0.0, minutes: float | None = None) -> float:
    """How far along a stage is, in [0, 1]: by steps, or by its time budget when that ends it sooner."""
    fraction = step / steps if steps else 0.0
    if minutes:
        fraction = max(fraction, seconds / (60 * minutes))
    return min(fraction, 1.0)


def lr_factor(schedule: str, progress: float) -> float:
    """The share of the learning rate that `schedule` gives at `progress` (0: start, 1: end)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}: choose from {', '.join(SCHEDULES)}")
